"""A manifest: what one stored model is, and which content-addressed blobs hold its files."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import PurePosixPath
from typing import Any

from deskpod.errors import CorruptModel
from deskpod.store.names import format_ref, parse_name

SCHEMA = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The file that engines and backends open, per format; folder formats have none.
PRIMARY_SUFFIX = {"gguf": ".gguf", "onnx": ".onnx"}


def check_relative(name: str) -> str:
    """A file name inside a model must stay inside it: relative, '/'-separated, no '..'."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise CorruptModel(f"file name {name!r} is not a relative path inside the model")
    return name


@dataclass(frozen=True)
class ManifestFile:
    name: str  # relative path inside the model, '/'-separated ("1_Pooling/config.json")
    sha256: str  # hex digest; the blob is blobs/sha256/<sha256>
    size: int  # bytes

    def __post_init__(self) -> None:
        check_relative(self.name)
        if not _SHA256.fullmatch(self.sha256):
            raise CorruptModel(f"manifest file {self.name!r} has an invalid sha256 {self.sha256!r}")
        if self.size < 0:
            raise CorruptModel(f"manifest file {self.name!r} has a negative size")


@dataclass(frozen=True)
class Manifest:
    name: str
    tag: str
    format: str  # "gguf" | "safetensors" | "onnx"
    architecture: str
    parameters: int
    quantization: str
    context_length: int
    size: int  # total bytes of all files
    files: tuple[ManifestFile, ...]
    source: str  # "pypi:pkg==ver" or the absolute local path it was pulled from
    created: str  # ISO 8601, UTC

    def __post_init__(self) -> None:
        parse_name(self.ref)  # a manifest read from disk must not name a path outside the store
        if not self.files:
            raise CorruptModel(f"manifest {self.ref} lists no files")

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.tag)

    @property
    def digest(self) -> str:
        """sha256 over the file list: identical file sets share one snapshot directory."""
        listing = json.dumps([asdict(f) for f in self.files], sort_keys=True)
        return hashlib.sha256(listing.encode()).hexdigest()

    @property
    def primary(self) -> ManifestFile | None:
        """The file to open for single-file formats (the .gguf / .onnx); None for folder models."""
        suffix = PRIMARY_SUFFIX.get(self.format)
        return next((f for f in self.files if suffix and f.name.endswith(suffix)), None)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self), "files": [asdict(f) for f in self.files]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build a manifest from its JSON form; CorruptModel when fields are missing or malformed."""
        try:
            values = {f.name: data[f.name] for f in fields(cls)}
            values["files"] = tuple(ManifestFile(**f) for f in data["files"])
            return cls(**values)
        except (KeyError, TypeError) as e:
            raise CorruptModel(f"manifest is malformed ({type(e).__name__}: {e})") from e
