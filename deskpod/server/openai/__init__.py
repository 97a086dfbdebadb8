"""The OpenAI API: one api_router + protocol + serving module per endpoint family."""
