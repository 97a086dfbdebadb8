"""A bounded coverage-guided fuzzing run (atheris) of the GGUF, safetensors and config.json readers, seeded with
tiny models' real files: any exception other than the format's own clear error (DeskpodError) fails the test,
with libFuzzer's report and the input that caused it (tests/formats/fuzz_readers.py does the reading)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.tiny_llama import write_tiny_llama

from deskpod.quant.convert import convert

pytest.importorskip("atheris", reason="atheris (a test dependency) is not installed")
FUZZER = Path(__file__).with_name("fuzz_readers.py")
RUNS = 4000  # per target: about 3-5 s each here


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    gguf = write_tiny_llama(root / "tiny.gguf")
    convert(gguf, root / "folder", "int8", keep=("*",))  # a float Hugging Face folder
    folders = {}
    for target, files in {"gguf": [gguf], "safetensors": [root / "folder" / "model.safetensors"],
                          "config": [root / "folder" / "config.json"]}.items():
        folders[target] = root / f"corpus-{target}"
        folders[target].mkdir()
        for f in files:
            shutil.copy(f, folders[target])
    return folders


@pytest.mark.parametrize("target", ["gguf", "safetensors", "config"])
def test_readers_raise_nothing_but_their_own_errors(seeds, target, tmp_path):
    command = [sys.executable, str(FUZZER), target, str(seeds[target]), f"-runs={RUNS}", "-seed=1",
               "-max_len=200000", "-rss_limit_mb=0",
               f"-artifact_prefix={tmp_path}/"]  # -rss_limit_mb=0: fuzz_readers.py checks memory itself
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert done.returncode == 0 and not crashes, f"{crashes}\n{done.stderr[-4000:]}"
    assert f"Done {RUNS} runs" in done.stderr
