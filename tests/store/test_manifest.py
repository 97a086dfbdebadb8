"""Manifest values: JSON round trip, digest, primary file, and refusal of names that escape the store."""

from __future__ import annotations

import dataclasses

import pytest

from deskpod.errors import CorruptModel, InvalidModelName
from deskpod.store import Manifest, ManifestFile

SHA = "ab" * 32


def make(files: tuple[ManifestFile, ...] = (ManifestFile("m.gguf", SHA, 10),), **kw: object) -> Manifest:
    fields = dict(
        name="m", tag="latest", format="gguf", architecture="llama", parameters=5, quantization="Q4_1",
        context_length=8, size=10, files=files, source="/x/m.gguf", created="2025-01-01T00:00:00+00:00",
    )  # fmt: skip
    return Manifest(**{**fields, **kw})  # type: ignore[arg-type]


def test_round_trip() -> None:
    m = make()
    assert Manifest.from_dict(m.to_dict()) == m
    assert m.to_dict()["schema"] == 1
    assert m.ref == "m:latest"
    assert m.primary == m.files[0]


def test_digest_depends_only_on_files() -> None:
    assert make().digest == make(name="other", created="2030-01-01T00:00:00").digest
    assert make().digest != make(files=(ManifestFile("m.gguf", "cd" * 32, 10),)).digest


def test_folder_models_have_no_primary_file() -> None:
    assert make(format="safetensors", files=(ManifestFile("config.json", SHA, 2),)).primary is None


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b", "", "a\\b"])
def test_file_names_must_stay_inside_the_model(name: str) -> None:
    with pytest.raises(CorruptModel, match="relative path"):
        ManifestFile(name, SHA, 1)


def test_malformed() -> None:
    with pytest.raises(CorruptModel, match="sha256"):
        ManifestFile("a", "not-hex", 1)
    with pytest.raises(InvalidModelName):
        make(name="../x")
    data = make().to_dict()
    del data["files"]
    with pytest.raises(CorruptModel, match="malformed"):
        Manifest.from_dict(data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        make().name = "y"  # type: ignore[misc]
