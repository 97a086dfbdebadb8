"""`deskpod pull | list | show | rm | verify` through argparse, against a store in a temp $DESKPOD_HOME."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from deskpod.store import Store
from deskpod.store.cli import register


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DESKPOD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: keep whole paths on one line
    return tmp_path / "home"


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="deskpod")
    register(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_pull_list_show_verify_rm(home: Path, tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("pull", str(tiny_gguf), "--name", "tiny:q0", "--json") == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled["name"] == "tiny" and pulled["tag"] == "q0" and pulled["architecture"] == "llama"

    assert run("list", "--json") == 0
    assert [m["name"] for m in json.loads(capsys.readouterr().out)] == ["tiny"]
    assert run("list") == 0
    assert "tiny:q0" in capsys.readouterr().out
    assert run("show", "tiny:q0", "--json") == 0
    assert json.loads(capsys.readouterr().out) == pulled
    assert run("show", "tiny:q0") == 0
    assert "Tiny-Llama.Q0.gguf" in capsys.readouterr().out

    assert run("verify") == 0
    assert "every blob matches" in capsys.readouterr().out
    blob = Store(home).model_file("tiny:q0")
    blob.chmod(0o644)
    blob.write_bytes(b"GGUF" + b"\0" * (blob.stat().st_size - 4))
    assert run("verify", "tiny:q0") == 1
    out = capsys.readouterr().out
    assert "tiny:q0: Tiny-Llama.Q0.gguf" in out and str(blob) in out and "corrupt" in out

    assert run("rm", "tiny:q0") == 0
    assert "removed tiny:q0" in capsys.readouterr().out
    assert run("list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not blob.exists()


def test_pull_prints_a_summary(home: Path, tiny_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("pull", str(tiny_onnx)) == 0
    assert "pulled tiny:latest" in capsys.readouterr().out


def test_pull_refuses_a_model_nothing_in_deskpod_runs(home: Path, tmp_path: Path, monkeypatch) -> None:
    from support.architectures import write_mixtral_gguf

    from deskpod.errors import UnsupportedModel

    path = write_mixtral_gguf(tmp_path / "mixtral.gguf", gating=2)  # sigmoid routing: not run here
    monkeypatch.chdir(tmp_path)  # the error names the model as typed
    with pytest.raises(UnsupportedModel, match=r"^./mixtral.gguf: .*expert_gating_func.*Nothing was stored.*--force"):
        run("pull", "./mixtral.gguf")
    assert Store().list() == []
    assert run("pull", str(path), "--force", "--json") == 0  # stored anyway when asked
    assert [m.name for m in Store().list()] == ["mixtral"]


def test_pull_names_the_architectures_the_engine_runs(home: Path, tmp_path: Path) -> None:
    from support.tiny_llama import write_tiny_llama

    from deskpod.errors import UnsupportedModel

    path = write_tiny_llama(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(UnsupportedModel, match=r"architecture 'falcon' is not supported.*gemma3.*llama.*qwen2.*qwen3"):
        run("pull", str(path))
    assert Store().list() == []

