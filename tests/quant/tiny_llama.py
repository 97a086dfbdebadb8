"""The engine tests' tiny random Llama GGUF writer, for the quantization tests (shared, not copied).

tests/engine/conftest.py holds it with the engine's fixtures; a conftest cannot be imported by name
from another folder, so it is loaded here by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_engine_fixtures", Path(__file__).parents[1] / "engine" / "conftest.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

write_tiny_llama = _module.write_tiny_llama
TOKENS = _module.TOKENS
