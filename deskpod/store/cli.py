"""`deskpod pull | list | show | rm | verify`: the store's subcommands, printed with rich."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deskpod.store.manifest import Manifest
from deskpod.store.names import format_ref, parse_name
from deskpod.store.store import Store

if TYPE_CHECKING:
    from deskpod.formats.meta import ModelMeta


def register(subparsers: Any) -> None:
    """Add the store's subcommands to the main CLI's argparse subparsers; each sets func=handler(args) -> int."""
    p = subparsers.add_parser("pull", help="download a catalog model, or add a local .gguf / .onnx / HF folder")
    p.add_argument("source", metavar="NAME|PATH")
    p.add_argument("--name", help="store it under this name[:tag] instead of its own")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON, no progress bars")
    p.add_argument("--force", action="store_true", help="store it even if no part of deskpod can run it")
    p.set_defaults(func=pull)

    p = subparsers.add_parser("list", help="list stored models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=list_models)

    p = subparsers.add_parser("show", help="show one model's manifest")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=show)

    p = subparsers.add_parser("rm", help="remove a model and the blobs only it used")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=remove)

    p = subparsers.add_parser("verify", help="re-hash the blobs of one model or all; exit 1 on any problem")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.set_defaults(func=verify)


def pull(args: argparse.Namespace) -> int:
    check = None if args.force else lambda meta: check_runnable(meta, args.source)
    manifest = Store().pull(args.source, name=args.name, progress=not args.json, check=check)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
    else:
        Console().print(f"pulled [bold]{manifest.ref}[/] ({_summary(manifest)})")
    return 0


def check_runnable(meta: ModelMeta, label: str) -> None:
    """Refuse what no part of deskpod runs: an LLM whose architecture, or a feature of it, the engine lacks
    (ONNX models and embedding models are served by their own backends)."""
    from deskpod.embed import EMBEDDING_ARCHITECTURES

    if meta.format == "onnx" or meta.architecture in EMBEDDING_ARCHITECTURES:
        return
    from deskpod.engine.models import architecture
    from deskpod.engine.models import check_runnable as engine_check
    from deskpod.errors import UnsupportedModel

    try:
        if meta.spec is None:
            architecture(meta.architecture, label)  # an unsupported kind says so, with what is supported
            raise UnsupportedModel(f"{label}: its {meta.format} metadata does not describe a model deskpod can run "
                                   f"({meta.spec_problem})")
        engine_check(meta.spec, label)
    except UnsupportedModel as e:
        raise UnsupportedModel(f"{e}. Nothing was stored (`deskpod pull --force` stores it anyway)") from None


def list_models(args: argparse.Namespace) -> int:
    manifests = Store().list()
    if args.json:
        print(json.dumps([m.to_dict() for m in manifests], indent=2))
        return 0
    table = Table("NAME", "FORMAT", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "CREATED")
    for m in manifests:
        table.add_row(
            m.ref, m.format, m.architecture, _count(m.parameters), m.quantization,
            str(m.context_length), _bytes(m.size), m.created[:19].replace("T", " "),
        )  # fmt: skip
    Console().print(table if manifests else "no models yet: try `deskpod pull smollm2`")
    return 0


def show(args: argparse.Namespace) -> int:
    store = Store()
    manifest = store.get(args.name)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return 0
    fields = Table.grid(padding=(0, 2))
    for key, value in manifest.to_dict().items():
        if key not in ("files", "schema"):
            fields.add_row(key, escape(str(value)))
    files = Table("FILE", "SIZE", "SHA256")
    for f in manifest.files:
        files.add_row(escape(f.name), _bytes(f.size), f.sha256[:16])
    console = Console()
    console.print(fields)
    console.print(files)
    return 0


def remove(args: argparse.Namespace) -> int:
    Store().remove(args.name)
    Console().print(f"removed {format_ref(*parse_name(args.name))}")
    return 0


def verify(args: argparse.Namespace) -> int:
    store = Store()
    problems = store.verify(args.name)
    console = Console(highlight=False)
    for problem in problems:
        console.print(f"[red]✗[/] {escape(problem)}")
    if problems:
        return 1
    checked = args.name or f"{len(store.list())} model(s)"
    console.print(f"[green]✓[/] {checked}: every blob matches its sha256")
    return 0


def _summary(m: Manifest) -> str:
    return f"{m.architecture}, {_count(m.parameters)} parameters, {m.quantization}, {_bytes(m.size)}"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
