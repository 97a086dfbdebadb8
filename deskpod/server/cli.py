"""`deskpod serve [NAME ...]`: pull what is missing, load the models, serve them over HTTP."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from deskpod.errors import DeskpodError
from deskpod.server.config import DEFAULT_MODEL, EngineOptions, ServerConfig

API_KEY_ENV = "DESKPOD_API_KEY"


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    p.add_argument(
        "models",
        nargs="*",
        metavar="NAME",
        help=f"store models to serve (default: {DEFAULT_MODEL}); catalog models are pulled",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--memory-fraction", type=float, default=None, help="share of free memory for each LLM's KV cache"
    )
    size.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size per LLM, in GB")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429 (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=None, help="most tokens per request, prompt and reply (default: the model's)")
    p.set_defaults(func=serve)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine = EngineOptions(args.memory_fraction, args.kv_cache_gb, args.max_num_seqs, args.max_waiting, args.ctx)
    return ServerConfig(
        models=tuple(args.models or [DEFAULT_MODEL]),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        insecure=args.insecure,
        engine=engine,
    )


def serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # refuses an exposed host without a key before anything loads
    from deskpod.store import Store

    store = Store()
    for name in config.models:
        store.ensure(name, progress=sys.stderr.isatty())

    import uvicorn

    from deskpod.server.app import create_app
    from deskpod.server.registry import ModelRegistry

    registry = ModelRegistry.load(list(config.models), config.engine)
    uvicorn.run(
        create_app(config, registry), host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `serve` on its own: python -m deskpod.server.cli [NAME ...] [options]."""
    parser = argparse.ArgumentParser(prog="deskpod")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except DeskpodError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
