"""The KServe v2 / Triton inference protocol over HTTP and gRPC, in front of a model repository and the LLMs."""
