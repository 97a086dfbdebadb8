"""CPU matmul speed of the quantized-weight kernels (deskpod.quant.cpu) against their alternatives, in one run.

    python benchmarks/quant_kernels.py                 # SmolLM2's matrix shapes, M = 1, 8, 128, 2 threads
    python benchmarks/quant_kernels.py --threads 1     # steadier on a shared machine
    python benchmarks/quant_kernels.py --hot           # weights left in cache between calls
    python benchmarks/quant_kernels.py --crossover     # also: matvec kernels vs tiled GEMM for M = 8..64
    python benchmarks/quant_kernels.py --layouts       # instead: GGUF blocks interleaved vs as the file holds them

For each weight shape [out, in] and number of activation rows M, every scheme's CPUWeights forward is timed
against F.linear on the same weight expanded to float32 (what running without the kernels would keep
resident, at 32 bits per weight) and against the engine's kernels over GGUF's own blocks (Q4_0 for the 4-bit
schemes, Q8_0 for the 8-bit ones, on a weight of the same shape).

By default the weights stream from memory, as when decoding a model larger than the cache, where every
weight is read once per token: each candidate gets enough copies of its weight to fill --stream-mib, and a
timed run applies x to all of them in turn (per-call time = run / copies). --hot times a single copy, left in
cache, as for a matrix used over and over. All candidates of a cell are timed in interleaved rounds and each
keeps its fastest run: on a shared machine other work only ever adds time. The ratios are the result, the
absolute figures are this machine's.
"""

from __future__ import annotations

import argparse
import time
from copy import deepcopy
from functools import partial

import torch
import torch.nn.functional as F

from deskpod.quant import quantize
from deskpod.quant.cpu import MATVEC_MAX_ROWS, CPUWeights, cpu_weights
from deskpod.quant.ggml import GGML_TYPES, INTERLEAVED, BlockWeight

# SmolLM2-135M: MLP down [576, 1536], MLP up/gate [1536, 576], output head [49152, 576]
SHAPES = [(576, 1536), (1536, 576), (49152, 576)]
SCHEMES = ["nvfp4", "mxfp4", "int4", "fp8", "fp8_e5m2", "int8"]
BASELINE = {"nvfp4": "Q4_0", "mxfp4": "Q4_0", "int4": "Q4_0", "fp8": "Q8_0", "fp8_e5m2": "Q8_0", "int8": "Q8_0"}


def fastest_ms(calls: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Milliseconds per call of each entry: a list of callables (copies of one weight) applied to x in turn,
    fastest of `rounds` interleaved rounds."""
    best = {name: float("inf") for name in calls}
    for fns in calls.values():  # warm-up: first-call allocations, lazy kernel loads
        fns[0](x)
    for _ in range(rounds):
        for name, fns in calls.items():
            reps = max(1, 5 // len(fns))
            start = time.perf_counter()
            for _ in range(reps):
                for fn in fns:
                    fn(x)
            best[name] = min(best[name], (time.perf_counter() - start) / (reps * len(fns)))
    return {name: t * 1e3 for name, t in best.items()}


def copies(make, nbytes: int, stream_bytes: int) -> list:
    """Enough independent copies of one weight (make() builds one of `nbytes`) to fill stream_bytes."""
    return [make() for _ in range(max(1, -(-stream_bytes // nbytes)))]


def fresh_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose buffers own exactly their bytes, in ordinary pages: a weight the engine holds in huge
    pages is a view into a 64 MB chunk shared with others, which deepcopy alone would copy whole."""
    return deepcopy(module, {id(b): b.clone() for b in module.buffers()})


def module_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def baselines(shape: tuple[int, int]) -> dict[str, torch.nn.Module]:
    """The engine's GGUF block kernels (Q4_0, Q8_0, as stored) on a random weight of this shape."""
    import gguf
    import numpy as np

    out, inp = shape
    w = np.random.default_rng(0).standard_normal((out, inp)).astype(np.float32)

    def blocks(kind: str) -> BlockWeight:
        raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
        return BlockWeight(kind, torch.from_numpy(np.ascontiguousarray(raw)), inp)

    return {"Q4_0": blocks("Q4_0"), "Q8_0": blocks("Q8_0")}


def resident_bits(layer: CPUWeights) -> float:
    return 8 * sum(b.numel() * b.element_size() for b in layer.buffers()) / (layer.out_features * layer.in_features)


def main_table(args) -> None:
    stream = 0 if args.hot else args.stream_mib << 20
    print(f"{'shape':>12} {'M':>4} {'scheme':>9} {'bits':>5} {'kernel ms':>10} {'f32 ms':>8} {'ggml ms':>8}"
          f" {'f32/kernel':>10} {'ggml/kernel':>11}")
    for shape in SHAPES:
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02
        calls = {name: copies(lambda m=m: fresh_copy(m), module_bytes(m), stream) for name, m in baselines(shape).items()}
        bits = {}
        for s in args.schemes:
            layer = cpu_weights(quantize(weight, s))
            dense = layer.dequantize()
            bits[s] = resident_bits(layer)
            calls[s] = copies(lambda layer=layer: fresh_copy(layer), module_bytes(layer), stream)
            calls[f"{s}:f32"] = copies(lambda w=dense: partial(F.linear, weight=w.clone()), dense.nbytes, stream)
        for m in args.rows:
            t = fastest_ms(calls, torch.randn(m, shape[1]), args.rounds)
            for s in args.schemes:
                k, f32, b = t[s], t[f"{s}:f32"], t[BASELINE[s]]
                print(f"{shape[0]:>5}x{shape[1]:<6} {m:>4} {s:>9} {bits[s]:>5.2f} {k:>10.3f} {f32:>8.3f}"
                      f" {b:>8.3f} {f32 / k:>10.2f} {b / k:>11.2f}", flush=True)
        del calls


def crossover_table(args) -> None:
    """Where decoding a block once per 8 rows (the matvec kernels) stops beating expand-to-float + GEMM."""
    shape = (1536, 576)
    weight = torch.randn(shape) * 0.02
    print(f"\nmatvec kernel vs tiled GEMM, hot weight {shape[0]}x{shape[1]} (MATVEC_MAX_ROWS = {MATVEC_MAX_ROWS})")
    print(f"{'scheme':>9} " + " ".join(f"{'M=' + str(m):>14}" for m in args.crossover_rows) + "   (matvec/gemm ms)")
    for s in args.schemes:
        layer = cpu_weights(quantize(weight, s))
        cells = []
        for m in args.crossover_rows:
            paths = {"matvec": [layer._matmul], "gemm": [layer._tiled_gemm]}
            t = fastest_ms(paths, torch.randn(m, shape[1]), args.rounds)
            cells.append(f"{t['matvec']:.2f}/{t['gemm']:.2f}")
        print(f"{s:>9} " + " ".join(f"{c:>14}" for c in cells), flush=True)


def layouts_table(args) -> None:
    """The GGUF kernels over each type the engine interleaves: its rows as the file holds them against rows
    interleaved eight at a time, both in ordinary 4 KB pages, and the interleaved weight in the huge pages the
    engine holds it in (deskpod.quant.pages; where the system gives none, the last two are alike)."""
    import gguf
    import numpy as np

    stream = 0 if args.hot else args.stream_mib << 20
    print(f"{'shape':>12} {'M':>4} {'type':>5} {'rows ms':>8} {'x8 ms':>8} {'x8 huge ms':>10} {'rows/x8':>8}"
          f" {'rows/x8 huge':>12}")
    for out, inp in SHAPES:
        w = np.random.default_rng(0).standard_normal((out, inp)).astype(np.float32)
        for kind in sorted(INTERLEAVED & set(GGML_TYPES)):
            raw = torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])))

            def held(interleave: bool, huge: bool, kind=kind, raw=raw) -> BlockWeight:
                layer = BlockWeight(kind, raw, inp, interleave=interleave)
                if not huge:
                    layer.blocks = layer.blocks.clone()  # the allocator's ordinary pages
                return layer

            calls = {name: copies(partial(held, *how), raw.nbytes, stream)
                     for name, how in (("rows", (False, False)), ("x8", (True, False)), ("x8 huge", (True, True)))}
            for m in args.rows:
                t = fastest_ms(calls, torch.randn(m, inp), args.rounds)
                print(f"{out:>5}x{inp:<6} {m:>4} {kind:>5} {t['rows']:>8.3f} {t['x8']:>8.3f} {t['x8 huge']:>10.3f}"
                      f" {t['rows'] / t['x8']:>8.2f} {t['rows'] / t['x8 huge']:>12.2f}", flush=True)
            del calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--schemes", nargs="+", default=SCHEMES, choices=SCHEMES)
    parser.add_argument("--rounds", type=int, default=15, help="timed runs of each candidate per cell")
    parser.add_argument("--hot", action="store_true", help="one copy of each weight, left in cache")
    parser.add_argument("--stream-mib", type=int, default=128, help="weights streamed per timed run")
    parser.add_argument("--crossover", action="store_true")
    parser.add_argument("--crossover-rows", type=int, nargs="+", default=[8, 16, 20, 24, 32, 64])
    parser.add_argument("--layouts", action="store_true", help="instead: the GGUF kernels over interleaved rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mode = "hot weights" if args.hot else f"weights streamed ({args.stream_mib} MiB per run)"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {mode}")
    if args.layouts:
        layouts_table(args)
        return
    main_table(args)
    if args.crossover:
        crossover_table(args)


if __name__ == "__main__":
    main()
