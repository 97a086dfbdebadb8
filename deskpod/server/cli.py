"""`deskpod serve [NAME ...] [--model-repository DIR]`: pull what is missing, load the models, serve them
over HTTP (OpenAI /v1 and KServe v2 /v2) and, with a repository, KServe v2 gRPC on the same host."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from deskpod.engine.config import (DEVICE_HELP, KV_CACHE_DTYPE_HELP, KV_CACHE_DTYPES, SPECULATIVE_HELP, WEIGHT_MODES,
                                   EngineConfig, SpeculativeConfig, resolve_device)
from deskpod.errors import DeskpodError
from deskpod.link.cli import add_serve_options as add_link_options
from deskpod.link.cli import link_config
from deskpod.server.config import (
    DEFAULT_GRPC_PORT,
    DEFAULT_MAX_REQUEST_MB,
    DEFAULT_MODEL,
    MODEL_CONTROL_MODES,
    ServerConfig,
)

if TYPE_CHECKING:
    from deskpod.backends.repository import ModelRepository

API_KEY_ENV = "DESKPOD_API_KEY"


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve models over an OpenAI-compatible HTTP API and KServe v2 / Triton (HTTP, gRPC)"
    )
    p.add_argument(
        "models",
        nargs="*",
        metavar="NAME",
        help=f"store models to serve (default: {DEFAULT_MODEL}, none with --model-repository); catalog models are pulled",
    )
    p.add_argument(
        "--model-repository",
        metavar="DIR",
        default=None,
        help="a Triton-style model repository (DIR/<model>/config.pbtxt, DIR/<model>/<version>/...) to serve over KServe v2",
    )
    p.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default=None,
                   help="as Triton's: none (all loaded, the API may not load/unload), poll (the same, and changes to "
                        "the repository are loaded), explicit (only --load-model at start, the API loads/unloads); "
                        "default: all loaded and the API allowed")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="explicit mode: a model to load at start (repeatable; * for all)")
    p.add_argument("--repository-poll-secs", type=float, default=15.0,
                   help="poll mode: seconds between looks at the repository (default: %(default)g)")
    p.add_argument("--backend-config", action="append", default=[], metavar="BACKEND,KEY=VALUE",
                   help="a backend's setting, as Triton's (repeatable): python,stub-timeout-seconds=30 bounds starting "
                        "a Python model's process and its initialize; python,execute-timeout-seconds=N stops and "
                        "restarts one whose execute takes longer (default: no limit); python,memory-limit-mb=N caps each "
                        "Python model process's heap, one that runs out (a leak) is started again")
    grpc = p.add_mutually_exclusive_group()
    grpc.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help=f"KServe v2 gRPC port, on --host (default: {DEFAULT_GRPC_PORT} with --model-repository, none otherwise)",
    )
    grpc.add_argument("--no-grpc", action="store_true", help="no gRPC server")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="also serve /metrics on this port of --host, as Triton does on 8002 (the API key applies)")
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=DEFAULT_MAX_REQUEST_MB,
        help="largest request body (/v1, /v2) or gRPC message accepted, in MB (default: %(default)g)",
    )
    p.add_argument(
        "--allowed-origins",
        metavar="ORIGIN",
        nargs="+",
        default=(),
        help="let web pages from these origins call the API (CORS), e.g. http://localhost:3000, or '*'",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--no-access-log", action="store_true", help="do not log a line per request")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--memory-fraction", type=float, default=None, help="share of free memory for each LLM's KV cache"
    )
    size.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache size per LLM, in GB")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429 (default: %(default)s)")
    p.add_argument("--ctx", type=int, default=None, help="most tokens per request, prompt and reply (default: the model's)")
    p.add_argument("--weights", choices=WEIGHT_MODES, default="compact",
                   help="keep quantized weights in their stored blocks (default), or expand them to float32: slower, "
                        "and every reply independent of what else runs beside it")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto", help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the engines (default: all cores)")
    p.add_argument("--speculative-config", metavar="JSON", default=None, help=SPECULATIVE_HELP)
    add_link_options(p)
    p.set_defaults(func=serve)
    register_dashboard(subparsers)
    return p


def register_dashboard(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dashboard", help="open the dashboard of a running `deskpod serve` in the browser")
    p.add_argument("--url", default="http://127.0.0.1:8000/", help="the server's address (default: %(default)s)")
    p.set_defaults(func=open_dashboard)
    return p


def open_dashboard(args: argparse.Namespace) -> int:
    import urllib.request
    import webbrowser

    try:
        urllib.request.urlopen(args.url.rstrip("/") + "/health", timeout=5).close()
    except OSError as e:
        raise DeskpodError(f"no deskpod server answers at {args.url} ({e}): start one with `deskpod serve`") from e
    print(f"the dashboard: {args.url}")
    if not webbrowser.open(args.url):
        print("(no browser could be started here: open that address yourself)", file=sys.stderr)
    return 0


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine = EngineConfig(memory_fraction=args.memory_fraction, kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
                          max_waiting=args.max_waiting, context=args.ctx, weights=args.weights,
                          device=resolve_device(args.device), threads=args.threads, kv_cache_dtype=args.kv_cache_dtype,
                          speculative=SpeculativeConfig.from_json(args.speculative_config))
    repository = args.model_repository
    grpc_port = args.grpc_port if args.grpc_port is not None else (DEFAULT_GRPC_PORT if repository else None)
    return ServerConfig(
        models=tuple(args.models or ([] if repository else [DEFAULT_MODEL])),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        insecure=args.insecure,
        engine=engine,
        model_repository=repository,
        grpc_port=None if args.no_grpc else grpc_port,
        max_request_mb=args.max_request_mb,
        allowed_origins=tuple(args.allowed_origins),
        link=link_config(args),
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model),
        repository_poll_secs=args.repository_poll_secs,
        metrics_port=args.metrics_port,
        backend_config=parse_backend_config(args.backend_config),
    )


def parse_backend_config(values: list[str]) -> dict[str, dict[str, str]]:
    """["python,stub-timeout-seconds=5", ...] -> {"python": {"stub-timeout-seconds": "5"}}."""
    settings: dict[str, dict[str, str]] = {}
    for value in values:
        backend, _, setting = value.partition(",")
        key, equals, item = setting.partition("=")
        if not backend or not key or not equals:
            raise DeskpodError(f"--backend-config {value!r}: write it BACKEND,KEY=VALUE (python,stub-timeout-seconds=30)")
        settings.setdefault(backend, {})[key] = item
    return settings


def serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # refuses an exposed host without a key before anything loads
    from deskpod.store import Store

    store = Store()
    for name in config.models:
        if not store.has(name) and not sys.stderr.isatty():  # a terminal shows the download's progress bar
            print(f"{name} is not in the store yet: pulling it from the catalog", file=sys.stderr)
        store.ensure(name, progress=sys.stderr.isatty())

    import uvicorn

    from deskpod.server.app import create_app
    from deskpod.server.registry import ModelRegistry

    repository = load_repository(config.model_repository, config.model_control_mode, config.load_models,
                                 config.backend_config)
    registry = ModelRegistry.load(list(config.models), config.engine, config.link)
    # the gRPC server starts in the app's lifespan: on uvicorn's event loop, beside the HTTP server
    uvicorn.run(
        create_app(config, registry, repository),
        host=config.host,
        port=config.port,
        log_level="info",
        access_log=not args.no_access_log,
        timeout_graceful_shutdown=5,
        # asyncio's own loop, never uvloop where it happens to be installed: the gRPC server (grpc.aio) shares it
        loop="asyncio",
    )
    return 0


def load_repository(root: str | None, mode: str | None = None, load_models: tuple[str, ...] = (),
                    backend_config: dict[str, dict[str, str]] | None = None) -> ModelRepository | None:
    """The repository with its models tried (all, or in explicit mode those named): one that fails is
    UNAVAILABLE with its reason, the others serve."""
    if root is None:
        return None
    from deskpod.backends.control import load_at_start
    from deskpod.backends.repository import ModelRepository

    repository = ModelRepository(root, backend_config)
    load_at_start(repository, mode, load_models)
    return repository


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
