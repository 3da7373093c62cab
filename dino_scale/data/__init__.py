"""Data: decoding images, WebDataset shards, image folders and items, multi-crop augmentation, DataLoaders."""
