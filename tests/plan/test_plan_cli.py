import argparse
import json
import subprocess
import sys

from deskpod.plan import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_for_one_profile(capsys):
    code, out, _ = run(capsys, "200b", "--precision", "fp4", "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["nodes_needed"] == 1 and data["max_context"] >= 8192
    assert data["memory"]["total_bytes"] > data["memory"]["weights"] > 100e9


def test_json_list_for_several_profiles(capsys):
    code, out, _ = run(capsys, "llama-3.1-405b", "-p", "nvfp4", "-H", "digits,digits-x2", "--json")
    first, second = json.loads(out)
    assert (first["hardware"], first["fits"], first["nodes_needed"]) == ("digits", False, 2)
    assert (second["hardware"], second["fits"], second["nodes_needed"]) == ("digits-x2", True, 2)


def test_tables(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run(capsys, "gpt-oss-20b", "-p", "mxfp4")
    assert code == 0
    for text in ("weights", "kv cache", "runtime overhead", "fits", "longest context", "prefill", "decode"):
        assert text in out
    code, out, _ = run(capsys, "gpt-oss-20b", "-H", "digits,rtx-5090,h100")
    assert code == 0 and "rtx-5090" in out and "time to first token" in out


def test_user_errors_exit_1_with_a_message(capsys):
    code, _, err = run(capsys, "llama-3.1-8", "--json")
    assert code == 1 and "Did you mean: llama-3.1-8b" in err
    code, _, err = run(capsys, "--", "-3b")
    assert code == 1 and "not a size" in err
    code, _, err = run(capsys, "llama-3.1-8b", "--context", "-4")
    assert code == 1 and "context must be a positive number" in err


def test_register_adds_the_subcommand():
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "smollm2", "--batch", "3"])
    assert args.func is cli.handler and args.batch == 3 and args.hardware == "digits"


def test_as_a_subprocess_without_torch():
    code = ("import json, sys; from deskpod.plan.cli import main; main(['llama-3.1-8b', '--json']); "
            "print(json.dumps('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan, torch_loaded = done.stdout.strip().rsplit("\n", 1)
    assert json.loads(plan)["fits"] is True
    assert json.loads(torch_loaded) is False
