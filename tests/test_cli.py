"""The `deskpod` command as a user runs it: a real subprocess, real model, output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REFERENCE = Path(__file__).parent / "data" / "smollm2-greedy.json"


def deskpod(*args: str) -> subprocess.CompletedProcess:
    # the session's $DESKPOD_HOME (set by conftest) is inherited: no test touches ~/.deskpod
    return subprocess.run([sys.executable, "-m", "deskpod.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def smollm2_path(smollm2_gguf, tmp_path_factory) -> Path:
    """The store's blob under a .gguf name, as a user would pass a downloaded file."""
    path = tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.symlink_to(smollm2_gguf)
    return path


def test_run_raw_json_matches_llama_cpp_prompt_ids(smollm2_path):
    results = json.loads(REFERENCE.read_text())["results"]
    [raw] = [r for r in results if r["mode"] == "raw" and r["prompt"] == "The capital of France is"]
    result = deskpod("run", str(smollm2_path), raw["prompt"], "--raw", "--json", "--temperature", "0", "--max-tokens", "8",
                     "--weights", "float32")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt_token_ids"] == raw["prompt_token_ids"]
    # with float32 weights deskpod's greedy tokens are transformers' float32 ones (see test_reference.py)
    assert out["token_ids"] == raw["transformers_fp32_completion_token_ids"][:8]
    assert out["text"] == " Paris.\n\nThe answer is:" and out["finish_reason"] == "length"


def test_unknown_model_lists_what_there_is(smollm2_gguf):
    line = assert_one_line_error(deskpod("run", "no-such-model", "hi"))
    assert "no-such-model" in line and "smollm2" in line


def test_corrupt_model_file_is_named(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)  # the magic, then garbage (truncation: tests/formats)
    line = assert_one_line_error(deskpod("run", str(path), "hi"))
    assert str(path) in line


def test_bad_sampling_value_fails_before_loading():
    line = assert_one_line_error(deskpod("run", "no-such-model", "hi", "--temperature", "-1"))
    assert "temperature" in line


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--help"], ["run", "chat"]),
        (["run", "--help"], ["--raw", "--json", "--temperature", "--max-tokens", "--seed", "--stop"]),
        (["chat", "--help"], ["--system", "--temperature"]),
        (["quantize", "--help"], ["--to", "nvfp4", "mxfp4", "--name"]),
        (["serve", "--help"], ["--model-repository", "--grpc-port", "--device"]),
        (["deploy", "--help"], ["--gpu", "--hardware", "--kserve", "--max-replicas", "--apply"]),
    ],
)
def test_help(args, words):
    result = deskpod(*args)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("usage: deskpod") and all(w in result.stdout for w in words)


@pytest.mark.parametrize(("device", "words"), [("gpu", "--device must be auto, cpu, cuda or cuda:N"),
                                               ("cuda:7", "--device cuda:7: torch")])
def test_a_device_torch_cannot_use_is_refused_before_loading(device, words):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    line = assert_one_line_error(deskpod("run", "no-such-model", "hi", "--device", device))
    assert words in line


def test_help_imports_no_torch():
    """`deskpod --help` answers at once: building the parser must not pull in torch or onnxruntime."""
    code = "import sys; from deskpod.cli import build_parser; build_parser(); print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_version():
    result = deskpod("--version")
    assert result.returncode == 0 and result.stdout.startswith("deskpod ")


def test_a_base_model_runs_raw_and_refuses_to_chat(tmp_path):
    from support.tiny_llama import write_tiny_llama

    path = write_tiny_llama(tmp_path / "base.gguf", chat=False)
    result = deskpod("run", str(path), "the heron", "--max-tokens", "3", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    assert "has no chat template (a base model, not a chat model): running the prompt as raw text" in result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 3
    line = assert_one_line_error(deskpod("chat", str(path)))
    assert "has no chat template" in line and "deskpod run" in line
