"""`deskpod serve`'s configuration: its options, and who may reach the server (loopback hosts, API keys)."""

from __future__ import annotations

import argparse

import pytest

from deskpod.errors import DeskpodError
from deskpod.server import cli
from deskpod.server.config import ServerConfig, check_exposure, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_an_exposed_host_needs_a_key_or_insecure() -> None:
    with pytest.raises(DeskpodError, match="--api-key"):
        check_exposure("0.0.0.0", None, insecure=False)
    check_exposure("0.0.0.0", "k", insecure=False)
    check_exposure("0.0.0.0", None, insecure=True)
    check_exposure("127.0.0.1", None, insecure=False)
    with pytest.raises(DeskpodError):
        ServerConfig(host="0.0.0.0")


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    config = cli.config_from_args(_args([]))
    assert (config.models, config.host, config.port, config.api_key) == (("smollm2",), "127.0.0.1", 8000, None)
    assert (config.engine.max_num_seqs, config.engine.max_waiting) == (32, 256)


def test_serve_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cli.API_KEY_ENV, "from-env")
    config = cli.config_from_args(
        _args(
            [
                "smollm2",
                "minilm",
                "--host",
                "0.0.0.0",
                "--kv-cache-gb",
                "0.5",
                "--max-num-seqs",
                "4",
                "--max-waiting",
                "2",
            ]
        )
    )
    assert config.models == ("smollm2", "minilm") and config.api_key == "from-env"
    assert (config.engine.kv_cache_gb, config.engine.max_num_seqs, config.engine.max_waiting) == (0.5, 4, 2)
    assert cli.config_from_args(_args(["--api-key", "flag"])).api_key == "flag"


def test_serve_refuses_bad_sizes() -> None:
    with pytest.raises(SystemExit):  # argparse: mutually exclusive
        _args(["--memory-fraction", "0.5", "--kv-cache-gb", "1"])
    with pytest.raises(DeskpodError, match="memory-fraction"):
        cli.config_from_args(_args(["--memory-fraction", "1.5"]))
    with pytest.raises(DeskpodError, match="at least 1"):
        cli.config_from_args(_args(["--max-waiting", "0"]))
