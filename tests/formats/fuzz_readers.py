"""Coverage-guided fuzzing (atheris, libFuzzer) of the model readers: whatever bytes a GGUF file, a safetensors
file or a config.json holds, reading it ends in the model or in the format's own clear error (DeskpodError),
never another exception. Run by tests/formats/test_fuzz.py:

    python tests/formats/fuzz_readers.py gguf CORPUS_DIR -runs=3000 -seed=1

The first argument picks the target; the rest go to libFuzzer (a corpus folder seeded with real files, -runs,
-seed, -max_len ...).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["deskpod"]):  # every reader module, so coverage guides the mutations
    from deskpod.errors import DeskpodError
    from deskpod.formats import gguf, gguf_tokenizer, safetensors, spec, weights  # noqa: F401
    from deskpod.formats.gguf_tokenizer import vocabulary_from_gguf
    from deskpod.formats.meta import read_meta
    from deskpod.formats.weights import open_weights

SCRATCH = Path(tempfile.mkdtemp(prefix="deskpod-fuzz-"))
CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32, "max_position_embeddings": 64}


def read_everything(path: Path) -> None:
    """What loading does with a file before any weight is computed with: metadata, the spec, every tensor."""
    read_meta(path)
    source = open_weights(path)
    for tensor in source.tensors():
        if len(tensor.shape) <= 2 and tensor.n_elements <= 1 << 16 and not hasattr(tensor, "parts"):
            tensor.float()


def gguf_target(data: bytes) -> None:
    path = SCRATCH / "model.gguf"
    path.write_bytes(data)
    read_everything(path)
    source = open_weights(path)
    vocabulary_from_gguf(source.gguf.metadata, "fuzzed")


def safetensors_target(data: bytes) -> None:
    folder = SCRATCH / "folder"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "model.safetensors").write_bytes(data)
    read_everything(folder)


def config_target(data: bytes) -> None:
    folder = SCRATCH / "config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    if not (folder / "model.safetensors").exists():
        (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # an empty but valid file
    read_everything(folder)


TARGETS = {"gguf": gguf_target, "safetensors": safetensors_target, "config": config_target}
# libFuzzer's own -rss_limit_mb reads getrusage's peak, which Linux carries over from the parent across fork
# and exec (a pytest process of a few GB would trip it before the first input): the tests pass -rss_limit_mb=0
# and this limit is checked on the process's own high-water mark instead.
PEAK_LIMIT_MB = 2048


def peak_mb() -> int:
    status = Path("/proc/self/status")
    if not status.exists():
        return 0
    line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) // 1024


def main() -> None:
    target = TARGETS[sys.argv[1]]

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except DeskpodError:
            pass  # the format's own clear error: what bad input must get
        if peak_mb() > PEAK_LIMIT_MB:
            raise MemoryError(f"reading this input took the process to {peak_mb()} MB")

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
