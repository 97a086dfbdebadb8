"""`deskpod serve`: the OpenAI-compatible HTTP server over the engine and the embedding models."""
