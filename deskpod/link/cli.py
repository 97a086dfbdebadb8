"""`deskpod join ADDR:PORT --link-token T`, and the link options of `deskpod serve`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from deskpod.engine.config import DEVICE_HELP, EngineConfig, resolve_device
from deskpod.link.config import DEFAULT_LINK_PORT, PARALLEL_MODES, TOKEN_ENV, LinkConfig, nodes_from, parse_endpoint, token_from


def add_serve_options(p: argparse.ArgumentParser) -> None:
    link = p.add_argument_group("linked boxes", "serve one model across several boxes; the others run `deskpod join`")
    link.add_argument("--nodes", type=int, default=None,
                      help="boxes in the link, this one included (default: $WORLD_SIZE, else no link)")
    link.add_argument("--link", metavar="ADDR:PORT", default=None,
                      help="the address the other boxes join, bound on this address only "
                           f"(default: $MASTER_ADDR:$MASTER_PORT; port {DEFAULT_LINK_PORT})")
    link.add_argument("--link-token", default=None, help=f"a secret every box must hold (default: ${TOKEN_ENV})")
    link.add_argument("--parallel", choices=PARALLEL_MODES, default="pipeline",
                      help="pipeline: each box runs some layers; tensor: each runs part of every layer "
                           "(default: %(default)s)")
    link.add_argument("--link-timeout", type=float, default=30.0,
                      help="seconds a box may keep a step waiting before it is declared lost (default: %(default)g)")


def link_config(args: argparse.Namespace) -> LinkConfig | None:
    nodes = nodes_from(args.nodes)
    if nodes is None or (nodes == 1 and args.nodes is None):
        return None
    address, port = parse_endpoint(args.link)
    return LinkConfig(nodes, address, port, token_from(args.link_token), args.parallel, args.link_timeout)


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("join", help="join a `deskpod serve --nodes N` head: run this box's share of its model")
    p.add_argument("endpoint", metavar="ADDR:PORT", nargs="?", default=None,
                   help="the head's --link address (default: $MASTER_ADDR:$MASTER_PORT)")
    p.add_argument("--link-token", default=None, help=f"the head's link token (default: ${TOKEN_ENV})")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to keep trying while the head is not listening yet (default: %(default)g)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_join)
    return p


def cmd_join(args: argparse.Namespace) -> int:
    from deskpod.errors import DeskpodError
    from deskpod.link.worker import join

    address, port = parse_endpoint(args.endpoint)
    token = token_from(args.link_token)
    if not token:
        raise DeskpodError(f"give the head's link token: --link-token or ${TOKEN_ENV}")
    config = EngineConfig(threads=args.threads, device=resolve_device(args.device))
    join(address, port, token, config, progress=lambda text: print(text, file=sys.stderr, flush=True), wait=args.wait)
    return 0
