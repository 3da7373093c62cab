"""dino-scale: DINO self-supervised training, from one CPU to many GPUs."""

__version__ = "0.1.0"
