"""`deskpod quantize NAME --to SCHEME [--name NEW]`: a quantized copy of a stored model, as a new store model.

The folder is written in a private temporary directory and then added to the store by the store's own
pull of a local folder (blobs first, manifest last): an interrupted or failed quantize leaves nothing
in the store, and the temporary directory is removed on the way out.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

# Listed here for --help without importing torch; convert.check_scheme() checks against deskpod.quant.SCHEMES.
SCHEME_NAMES = "fp8, fp8_e5m2, nvfp4, mxfp4, int4, int8"
QUANTIZABLE_FORMATS = ("gguf", "safetensors")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="write a low-precision copy of a stored model (GGUF or safetensors) as a new store model",
        description="Quantize a stored model's linear layers to SCHEME (any architecture deskpod runs: Llama, Mistral, "
        "Qwen2/3, Gemma 2/3); norms stay at the source's precision and "
        "the token embedding and LM head at 8 bits (int8 per 32). A GGUF source is expanded to float32 first, so "
        "any scheme can be asked of it (fp8 of a Q4_1 file keeps its values; it gains no precision). A model that "
        "is already quantized by deskpod is refused: quantize its original.",
    )
    p.add_argument("model", metavar="NAME", help="a store model (pulled first if it is in the catalog)")
    p.add_argument("--to", dest="scheme", required=True, metavar="SCHEME", help=f"one of {SCHEME_NAMES}")
    p.add_argument("--name", default=None, help="store it as this name[:tag] (default: NAME-SCHEME)")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="keep modules matching this pattern at the source precision, e.g. lm_head or "
                   "'model.layers.0.*' (repeatable; recorded in quantization_config.ignore)")
    p.set_defaults(func=quantize_command)


def default_name(source_ref: str, scheme: str) -> str:
    """'smollm2' -> 'smollm2-nvfp4'; 'smollm2:v2' -> 'smollm2-v2-nvfp4'."""
    from deskpod.store.names import DEFAULT_TAG, parse_name, sanitize_name

    name, tag = parse_name(source_ref)
    return sanitize_name(f"{name}-{scheme}" if tag == DEFAULT_TAG else f"{name}-{tag}-{scheme}")


def quantize_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from deskpod.errors import InvalidModelName, UnsupportedModel
    from deskpod.quant.convert import check_scheme, open_source
    from deskpod.store import Store
    from deskpod.store.names import parse_name

    check_scheme(args.scheme)  # before pulling or reading anything
    new_name = args.name or default_name(args.model, args.scheme)
    store = Store()
    manifest = store.ensure(args.model)
    if parse_name(new_name) == (manifest.name, manifest.tag):
        raise InvalidModelName(f"--name {new_name} would replace the model being quantized: choose another name")
    if manifest.format not in QUANTIZABLE_FORMATS:
        raise UnsupportedModel(f"{manifest.ref} is in {manifest.format} format; `deskpod quantize` converts GGUF and "
                               "safetensors models")
    source = store.model_file(manifest) if manifest.primary is not None else store.model_dir(manifest)
    # refuses an unsuitable model (already quantized, an architecture or a feature deskpod does not run) before
    # any progress bar
    from deskpod.engine.models import check_runnable

    check_runnable(open_source(source, manifest.ref).spec, manifest.ref)
    with tempfile.TemporaryDirectory(prefix="deskpod-quantize-") as tmp:
        folder = Path(tmp) / new_name.replace(":", "-")
        report = _convert_with_progress(source, folder, args, manifest.ref)
        stored = store.pull(str(folder), name=new_name, progress=True, origin=f"deskpod quantize {manifest.ref} --to {args.scheme}")
    kept = report.params.get(None, 0)
    Console().print(
        f"quantized [bold]{manifest.ref}[/] to {args.scheme} as [bold]{stored.ref}[/]: "
        f"{report.total_bytes / 1e6:,.1f} MB; {report.scheme_bits(args.scheme):.2f} bits/weight in the quantized "
        f"layers, {report.bits_per_weight:.2f} overall with the int8 embedding/head ({kept:,} weights kept precise)"
    )
    return 0


def _convert_with_progress(source: Path, folder: Path, args: argparse.Namespace, ref: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from deskpod.quant.convert import convert

    columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(f"quantizing {ref}", total=None)

        def step(group, index: int, total: int) -> None:
            label = group.tensors[0] if len(group.tensors) == 1 else f"{group.tensors[0]} +{len(group.tensors) - 1}"
            bar.update(task, description=f"{label} → {group.scheme or 'kept'}", completed=index, total=total)

        report = convert(source, folder, args.scheme, tuple(args.keep), source_name=ref, on_group=step)
        bar.update(task, description=f"quantized {ref}", completed=bar.tasks[0].total)
    return report
