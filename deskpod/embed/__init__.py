"""Sentence embeddings: a BERT encoder in PyTorch and the sentence-transformers pooling pipeline."""
