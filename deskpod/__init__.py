"""deskpod: the software of a personal AI supercomputer."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "SpeculativeConfig"]


def __getattr__(name: str):
    # Lazy, so `import deskpod` (and the CLI's --help) does not pay for importing torch.
    if name == "LLM":
        from deskpod.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from deskpod.engine.sampler import SamplingParams

        return SamplingParams
    if name == "SpeculativeConfig":
        from deskpod.engine.config import SpeculativeConfig

        return SpeculativeConfig
    raise AttributeError(f"module 'deskpod' has no attribute {name!r}")
