"""`deskpod plan MODEL`: will it fit, and how fast, on this box (or those)?"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from deskpod.errors import DeskpodError
from deskpod.plan.capacity import gb
from deskpod.plan.devices import HARDWARE, get_hardware
from deskpod.plan.planner import DEFAULT_CONTEXT, Plan, make_plan
from deskpod.plan.precision import KV_DTYPES, SCHEMES, kv_dtype_bytes
from deskpod.plan.source import resolve


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `plan` subcommand; the main CLI calls `args.func(args)`."""
    parser = subparsers.add_parser(
        "plan",
        help="will a model fit, and how fast will it run, on this hardware?",
        description="Plan memory and speed for an LLM before loading it. MODEL is a store model, a "
                    "GGUF file, a Hugging Face config.json (or its folder), a built-in name, or a size "
                    "such as 200b (a dense Llama-shaped model; write `plan -- -3b` for sizes with a sign).",
    )
    parser.add_argument("model")
    parser.add_argument("--hardware", "-H", default="digits",
                        help=f"profile(s), comma-separated: {', '.join([*HARDWARE, 'this'])}, or a "
                             ".json/.toml profile file (default: digits)")
    parser.add_argument("--precision", "-p", help=f"weights' precision: {', '.join(SCHEMES)} "
                        "(default: a file's own, else bf16)")
    parser.add_argument("--context", "-c", type=int,
                        help=f"tokens per sequence (default: {DEFAULT_CONTEXT:,} or the model's maximum)")
    parser.add_argument("--batch", "-b", type=int, default=1, help="concurrent sequences (default: 1)")
    parser.add_argument("--kv-dtype", default="bf16", choices=list(KV_DTYPES), help="KV cache element type")
    parser.add_argument("--force", action="store_true", help="allow a context above the model's maximum")
    parser.add_argument("--json", action="store_true", help="print JSON (one object, or a list for several profiles)")
    parser.set_defaults(func=handler)
    return parser


def handler(args: argparse.Namespace) -> int:
    source = resolve(args.model)
    profiles = [get_hardware(name.strip()) for name in args.hardware.split(",") if name.strip()]
    plans = [make_plan(source, hw, precision=args.precision, context=args.context, batch=args.batch,
                       kv_dtype_bytes=kv_dtype_bytes(args.kv_dtype), force=args.force) for hw in profiles]
    if args.json:
        payload = [p.to_json() for p in plans]
        print(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    elif len(plans) == 1:
        render_one(plans[0], Console())
    else:
        render_comparison(plans, Console())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `plan` on its own: python -m deskpod.plan.cli MODEL ..."""
    parser = argparse.ArgumentParser(prog="deskpod")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except DeskpodError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


# -- rendering ----------------------------------------------------------------------------------


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _seconds(value: float) -> str:
    return f"{value * 1e3:,.0f} ms" if value < 1 else f"{value:,.1f} s"


def _verdict(plan: Plan) -> str:
    if plan.fits:
        return "[green]fits[/green]"
    if plan.nodes_needed:
        return f"[red]does not fit[/red]: needs {plan.nodes_needed} linked boxes"
    return "[red]does not fit[/red] on up to 64 boxes"


def render_one(plan: Plan, console: Console) -> None:
    shape, memory, est = plan.source.shape, plan.memory, plan.speed
    moe = f", {shape.active_params / 1e9:.1f} B active" if shape.is_moe else ""
    console.print(f"[bold]{shape.name}[/bold]: {shape.total_params / 1e9:.2f} B parameters{moe}, "
                  f"{plan.precision} — {plan.source.origin}")
    console.print(f"on [bold]{plan.hardware.name}[/bold]: {plan.hardware.description}")
    table = Table(title=f"memory, {memory.context:,} tokens × {memory.batch} sequence(s)", title_justify="left")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("")
    totals = plan.memory_totals()
    kv_note = f"{memory.kv_per_token:,} bytes/token"
    for part, size in totals.items():
        table.add_row(part.replace("_", " "), gb(size), kv_note if part == "kv_cache" else "")
    table.add_row("[bold]total[/bold]", f"[bold]{gb(sum(totals.values()))}[/bold]",
                  f"of {gb(memory.available * memory.nodes)} usable")
    console.print(table)
    console.print(f"{_verdict(plan)}; longest context {plan.max_context:,} tokens; at {memory.context:,} tokens "
                  f"up to {plan.max_batch} concurrent sequences")
    console.print(f"prefill {_rate(est.prefill_tokens_per_s)} tokens/s, time to first token "
                  f"{_seconds(est.ttft_s)} ({est.prompt_tokens:,}-token prompt); decode "
                  f"{_rate(est.decode_tokens_per_s)} tokens/s per sequence"
                  + (f", {_rate(est.decode_throughput)} tokens/s for {est.batch}" if est.batch > 1 else ""))
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/dim]")


ROWS = (
    ("fits", lambda p: "[green]yes[/green]" if p.fits else "[red]no[/red]"),
    ("boxes needed", lambda p: str(p.nodes_needed or "> 64")),
    ("weights", lambda p: gb(p.weights.total)),
    ("KV cache", lambda p: gb(p.memory_totals()["kv_cache"])),
    ("total memory", lambda p: gb(sum(p.memory_totals().values()))),
    ("usable memory", lambda p: gb(p.memory.available * p.memory.nodes)),
    ("longest context", lambda p: f"{p.max_context:,}"),
    ("most sequences", lambda p: f"{p.max_batch:,}"),
    ("prefill tokens/s", lambda p: _rate(p.speed.prefill_tokens_per_s)),
    ("time to first token", lambda p: f"{_seconds(p.speed.ttft_s)} ({p.speed.prompt_tokens:,} tok)"),
    ("decode tokens/s", lambda p: _rate(p.speed.decode_tokens_per_s)),
    ("batch tokens/s", lambda p: _rate(p.speed.decode_throughput)),
)


def render_comparison(plans: list[Plan], console: Console) -> None:
    first = plans[0]
    shape = first.source.shape
    table = Table(title=f"{shape.name} at {first.precision}, {first.memory.context:,} tokens × "
                        f"{first.memory.batch} sequence(s)", title_justify="left")
    table.add_column("")
    for plan in plans:
        table.add_column(plan.hardware.name, justify="right")
    for label, cell in ROWS:
        table.add_row(label, *(cell(p) for p in plans))
    console.print(table)
    for plan in plans:
        for note in plan.notes:
            console.print(f"[dim]{plan.hardware.name}: {note}[/dim]")


if __name__ == "__main__":
    sys.exit(main())
