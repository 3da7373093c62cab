"""Retrieval: the embedding pipeline (embed.py), resumable index folders with search and dedup (index.py), and the
faiss layer under them (vector_index.py)."""
