"""Sentence embeddings: a BERT encoder in PyTorch and the sentence-transformers pooling pipeline."""

# config.json model types deskpod.embed runs (the server serves them on /v1/embeddings)
EMBEDDING_ARCHITECTURES = ("bert",)
