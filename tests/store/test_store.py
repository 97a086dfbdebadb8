"""The store on real files: local pulls, list/get/remove, verify, model_dir/model_file, garbage collection."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from deskpod.errors import CorruptModel, ModelNotFound, UnsupportedModel
from deskpod.formats.meta import read_meta
from deskpod.store import Store


@pytest.fixture
def fresh(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


def blobs(store: Store) -> list[Path]:
    return sorted(store.blobs.iterdir())


def test_pull_local_gguf(fresh: Store, tiny_gguf: Path) -> None:
    m = fresh.pull(str(tiny_gguf), progress=False)
    assert m.ref == "tiny-llama.q0:latest"  # the stem, lower-cased and sanitised
    assert (m.format, m.architecture, m.parameters, m.quantization, m.context_length) == (
        "gguf",
        "llama",
        672,
        "F16",
        256,
    )
    assert m.size == tiny_gguf.stat().st_size and m.source == str(tiny_gguf)
    assert [f.name for f in m.files] == ["Tiny-Llama.Q0.gguf"]
    blob = fresh.model_file(m)
    assert blob == fresh.blobs / m.files[0].sha256 and blob.read_bytes() == tiny_gguf.read_bytes()
    assert read_meta(blob).architecture == "llama"
    assert (fresh.model_dir(m) / "Tiny-Llama.Q0.gguf").resolve() == blob
    assert read_meta(fresh.model_dir(m)) == read_meta(tiny_gguf)  # a snapshot folder stands for its one file
    assert fresh.get("tiny-llama.q0") == m and fresh.list() == [m]


def test_pull_local_hf_folder(fresh: Store, tiny_hf_dir: Path) -> None:
    (tiny_hf_dir / ".git").mkdir()
    (tiny_hf_dir / ".git" / "HEAD").write_text("ref")
    (tiny_hf_dir / "pytorch_model.bin").write_bytes(b"pickle: never copied")
    m = fresh.pull(str(tiny_hf_dir), progress=False)
    assert (m.ref, m.format, m.architecture, m.parameters) == ("tiny-bert:latest", "safetensors", "bert", 104)
    names = ["1_Pooling/config.json", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert [f.name for f in m.files] == names
    folder = fresh.model_dir("tiny-bert")
    assert folder == fresh.model_dir(m)  # built once, then reused
    for name in names:
        assert (folder / name).is_symlink() and (folder / name).read_bytes() == (tiny_hf_dir / name).read_bytes()
    assert read_meta(folder) == read_meta(tiny_hf_dir)
    with pytest.raises(UnsupportedModel, match="model_dir"):
        fresh.model_file(m)


def test_pull_local_onnx_with_name(fresh: Store, tiny_onnx: Path) -> None:
    m = fresh.pull(str(tiny_onnx), name="vision:v1", progress=False)
    assert (m.ref, m.format, m.architecture, m.parameters) == ("vision:v1", "onnx", "onnx", 0)
    assert fresh.model_file("vision:v1").read_bytes() == tiny_onnx.read_bytes()


def test_pull_again_is_quick_and_picks_up_changes(fresh: Store, tiny_onnx: Path) -> None:
    first = fresh.pull(str(tiny_onnx), progress=False)
    assert fresh.pull(str(tiny_onnx), progress=False) == first  # same manifest, same created time
    tiny_onnx.write_bytes(b"a newer export")
    second = fresh.pull(str(tiny_onnx), progress=False)
    assert second.files[0].sha256 != first.files[0].sha256
    assert blobs(fresh) == [fresh.blob_path(second.files[0].sha256)]  # the old blob was collected


def test_identical_blobs_stored_once_and_collected_with_the_last_reference(fresh: Store, tiny_gguf: Path) -> None:
    fresh.pull(str(tiny_gguf), name="a", progress=False)
    fresh.pull(str(tiny_gguf), name="b", progress=False)
    assert len(blobs(fresh)) == 1 and [m.ref for m in fresh.list()] == ["a:latest", "b:latest"]
    snapshot = fresh.model_dir("a")
    fresh.remove("a")
    assert len(blobs(fresh)) == 1 and snapshot.exists()  # b shares blob and snapshot
    fresh.remove("b")
    assert blobs(fresh) == [] and not snapshot.exists() and fresh.list() == []
    with pytest.raises(ModelNotFound):
        fresh.get("a")


def test_not_found_lists_the_store_the_catalog_and_close_matches(fresh: Store, tiny_onnx: Path) -> None:
    fresh.pull(str(tiny_onnx), progress=False)
    with pytest.raises(ModelNotFound) as e:
        fresh.get("smollm")
    message = str(e.value)
    assert "tiny:latest" in message and "minilm" in message and "Did you mean smollm2" in message
    with pytest.raises(ModelNotFound):
        fresh.remove("nothing")
    with pytest.raises(ModelNotFound, match="neither a catalog model nor an existing file"):
        fresh.pull("./no/such/model.gguf", progress=False)


def test_verify_names_the_model_file_and_blob(fresh: Store, tiny_hf_dir: Path, tiny_gguf: Path) -> None:
    m = fresh.pull(str(tiny_hf_dir), progress=False)
    fresh.pull(str(tiny_gguf), progress=False)
    assert fresh.verify() == [] and fresh.verify("tiny-bert") == []
    weights = next(f for f in m.files if f.name == "model.safetensors")
    blob = fresh.blob_path(weights.sha256)
    blob.chmod(0o644)
    with blob.open("r+b") as f:  # same size, one byte flipped: only a re-hash finds it
        f.seek(100)
        f.write(b"\xff")
    assert fresh.verify() == [f"tiny-bert:latest: model.safetensors: blob {blob} is corrupt: its sha256 is "
                              + _sha256(blob)]  # fmt: skip
    assert fresh.verify("tiny-llama.q0") == []
    config = next(f for f in m.files if f.name == "config.json")
    fresh.blob_path(config.sha256).unlink()
    problems = fresh.verify("tiny-bert")
    assert len(problems) == 2 and f"config.json: blob {fresh.blob_path(config.sha256)} is missing" in problems[0]
    with pytest.raises(CorruptModel, match="missing"):
        fresh.model_dir(m)


def test_pull_repairs_a_missing_blob(fresh: Store, tiny_gguf: Path) -> None:
    m = fresh.pull(str(tiny_gguf), progress=False)
    fresh.model_file(m).unlink()
    fresh.pull(str(tiny_gguf), progress=False)
    assert fresh.verify() == []


def test_bad_local_sources_store_nothing(fresh: Store, tmp_path: Path, tiny_gguf: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    with pytest.raises(UnsupportedModel, match=r"pulls \.gguf"):
        fresh.pull(str(notes), progress=False)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:700])
    with pytest.raises(CorruptModel, match=r"cut\.gguf"):
        fresh.pull(str(cut), progress=False)
    assert fresh.list() == [] and not any(fresh.manifests.glob("*/*.json"))
    assert list(fresh.tmp.iterdir()) == []


def test_unreadable_manifest(fresh: Store, tiny_gguf: Path, tiny_onnx: Path) -> None:
    good = fresh.pull(str(tiny_onnx), progress=False)
    bad = fresh.pull(str(tiny_gguf), progress=False)
    path = fresh.manifests / bad.name / "latest.json"
    path.write_text("{ not json")
    assert fresh.list() == [good]
    assert len(problems := fresh.verify()) == 1 and str(path) in problems[0]
    with pytest.raises(CorruptModel, match="unreadable"):
        fresh.get(bad.ref)
    fresh.remove(good.ref)  # garbage collection keeps every blob while a manifest is unreadable
    assert fresh.blob_path(bad.files[0].sha256).exists()


def test_manifest_json_on_disk(fresh: Store, tiny_gguf: Path) -> None:
    m = fresh.pull(str(tiny_gguf), name="llm:q0", progress=False)
    data = json.loads((fresh.home / "manifests" / "llm" / "q0.json").read_text())
    assert data["files"] == [{"name": "Tiny-Llama.Q0.gguf", "sha256": m.files[0].sha256, "size": m.size}]
    assert fresh.model_file(m).stat().st_mode & 0o777 == 0o444  # blobs are read-only


def test_default_home_comes_from_the_environment(store_home: Path) -> None:
    assert Store().home == store_home


def test_store_copies_survive_a_moved_home(tmp_path: Path, tiny_hf_dir: Path) -> None:
    Store(tmp_path / "a").pull(str(tiny_hf_dir), progress=False)
    Store(tmp_path / "a").model_dir("tiny-bert")
    shutil.move(tmp_path / "a", tmp_path / "b")  # snapshot links are relative
    moved = Store(tmp_path / "b")
    assert (moved.model_dir("tiny-bert") / "config.json").read_text().startswith("{")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
