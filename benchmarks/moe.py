"""Mixture-of-Experts speed against llama.cpp, and what makes MoE worth it: more experts, same speed.

    bash benchmarks/setup_peers.sh     # once: llama.cpp's Python binding in the peers' venv
    python benchmarks/moe.py [--type Q4_1]   # ~1 B- and ~3.6 B-parameter random Qwen3-MoE GGUFs, Q4_0

No MoE model is installable from PyPI here, so the models are random: Qwen3-MoE's shape (q/k norms, 32 or
128 experts of which 4 run per token) written as GGUF in llama.cpp's layout with random Q4_0 blocks (weights
about ±0.08; router and norms in float). Speed does not depend on what the weights say, only on the bytes and
the operations, which are those of a real model of this shape. deskpod and llama.cpp (llama-cpp-python, same
file, same threads) are measured in rounds by decode.py's method; the larger model has 4× the experts and the
same active parameters per token, so its decode speed should stay close to the smaller one's.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))
from client import PeerError  # noqa: E402
from decode import add_kv_cache_dtype_option, measure_deskpod, measure_peer  # noqa: E402

SHAPE = dict(hidden=1024, layers=12, heads=16, kv_heads=4, head_dim=64, expert_ffn=768, top_k=4, vocab=320)
Q4_0, Q4_1, Q8_0 = 2, 3, 8  # ggml type ids
BLOCK = {Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34)}  # weights per block, bytes per block (fp16 scale first)
TYPES = {"Q4_0": Q4_0, "Q4_1": Q4_1, "Q8_0": Q8_0}


def random_blocks(rng: np.random.Generator, shape: tuple[int, ...], kind: int) -> np.ndarray:
    """Random blocks of a ggml type with a fixed small scale: [..., rows, bytes per row] uint8."""
    per_block, nbytes = BLOCK[kind]
    *lead, cols = shape
    data = rng.integers(0, 256, size=(*lead, cols // per_block, nbytes), dtype=np.uint8)
    scale = 0.002 if kind == Q8_0 else 0.01  # Q4_0: (q - 8) * d; Q4_1: q * d + m; Q8_0: q * d
    data[..., 0:2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    if kind == Q4_1:  # d, then the minimum m: q * d + m
        data[..., 2:4] = np.frombuffer(np.float16(-0.08).tobytes(), dtype=np.uint8)
    return data.reshape(*lead, cols // per_block * nbytes)


def write_model(path: Path, experts: int, kind: int = Q4_0, seed: int = 0) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    s = SHAPE
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_context_length(4096)
    w.add_embedding_length(s["hidden"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["expert_ffn"])
    w.add_expert_feed_forward_length(s["expert_ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_expert_count(experts)
    w.add_expert_used_count(s["top_k"])
    _tokenizer(w, s["vocab"])
    q = gguf.GGMLQuantizationType

    def blocks(name: str, shape: tuple[int, ...], block_type: int = kind) -> None:
        w.add_tensor(name, random_blocks(rng, shape, block_type), raw_dtype=q(block_type))

    def floats(name: str, shape: tuple[int, ...], scale: float) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32) if scale else np.ones(shape, np.float32))

    hidden, q_rows, kv_rows, ffn = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["expert_ffn"]
    blocks("token_embd.weight", (s["vocab"], hidden), Q8_0)
    blocks("output.weight", (s["vocab"], hidden), Q8_0)
    floats("output_norm.weight", (hidden,), 0)
    for i in range(s["layers"]):
        p = f"blk.{i}."
        floats(p + "attn_norm.weight", (hidden,), 0)
        floats(p + "ffn_norm.weight", (hidden,), 0)
        floats(p + "attn_q_norm.weight", (s["head_dim"],), 0)
        floats(p + "attn_k_norm.weight", (s["head_dim"],), 0)
        blocks(p + "attn_q.weight", (q_rows, hidden))
        blocks(p + "attn_k.weight", (kv_rows, hidden))
        blocks(p + "attn_v.weight", (kv_rows, hidden))
        blocks(p + "attn_output.weight", (hidden, q_rows))
        floats(p + "ffn_gate_inp.weight", (experts, hidden), 0.05)
        blocks(p + "ffn_gate_exps.weight", (experts, ffn, hidden))
        blocks(p + "ffn_up_exps.weight", (experts, ffn, hidden))
        blocks(p + "ffn_down_exps.weight", (experts, hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tokenizer(w, size: int) -> None:
    """A byte-level vocabulary (the 256 bytes, then filler tokens): enough for both engines to load; the
    prompts are token ids."""
    byte_tokens = [bytes([b]).decode("latin-1") for b in range(256)]
    tokens = byte_tokens + ["ab"] + [f"<t{i}>" for i in range(size - 257)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * size)
    w.add_token_merges(["a b"])  # llama.cpp wants merges: one
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def per_expert(measure):
    """`measure()` with every MoE layer running its experts one by one (MoE.block_experts off)."""
    from deskpod.engine.models.layers import MoE

    saved = MoE.block_experts
    MoE.block_experts = lambda self: None
    try:
        return measure()
    finally:
        MoE.block_experts = saved


def resident_weights(path: Path) -> int:
    """Bytes of weights deskpod holds for the file (its loader's count), in this process."""
    from deskpod.engine.config import EngineConfig
    from deskpod.engine.loader import load_model

    return load_model(path, EngineConfig(context=256)).weight_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="32,128", help="expert counts, comma-separated (default: %(default)s)")
    parser.add_argument("--type", default="Q4_0", choices=list(TYPES), help="the weights' block type (default: "
                        "%(default)s; llama.cpp repacks Q4_0 for its x86 kernels, not Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the GGUFs (default: a temporary folder)")
    parser.add_argument("--per-expert", action="store_true",
                        help="also measure deskpod running each layer's experts one by one (as before they ran two "
                             "kernel calls at a time), in the same rounds")
    add_kv_cache_dtype_option(parser)
    args = parser.parse_args()
    args.weights = "compact"
    folder = args.dir or Path(tempfile.mkdtemp(prefix="deskpod-moe-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for experts in map(int, args.experts.split(",")):
        path = folder / f"random-qwen3moe-{experts}x-{args.type}.gguf"
        if not path.exists():
            print(f"writing {path.name}...", file=sys.stderr)
            write_model(path, experts, TYPES[args.type])
        size = path.stat().st_size
        held = resident_weights(path)
        results: dict[str, list[dict]] = {"deskpod": [], "llamacpp": []} | ({"per-expert": []} if args.per_expert else {})
        for r in range(args.rounds):
            measures = [("deskpod", lambda: measure_deskpod(path, args)),
                        ("llamacpp", lambda: measure_peer("llamacpp", path, args))]
            if args.per_expert:
                measures.append(("per-expert", lambda: per_expert(lambda: measure_deskpod(path, args))))
            for name, measure in measures:
                try:
                    results[name].append(measure())
                except PeerError as e:
                    print(f"{name}: skipped ({str(e).splitlines()[0]})", file=sys.stderr)
                    continue
                got = results[name][-1]
                print(f"{experts} experts, round {r + 1} {name:9s} prefill {got['prefill_tok_s']:7.1f}  decode "
                      f"{got['decode_tok_s']:6.1f} tok/s", file=sys.stderr)
        summary = {n: {k: statistics.median(x[k] for x in runs) for k in ("prefill_tok_s", "decode_tok_s")}
                   for n, runs in results.items() if runs}
        rows.append((experts, size, held, summary))

    s = SHAPE
    print(f"\nrandom Qwen3-MoE, hidden {s['hidden']}, {s['layers']} layers, top-{s['top_k']} of N experts of width "
          f"{s['expert_ffn']}, {args.type}; {args.prompt_tokens}-token prompt, {args.gen_tokens} generated, {args.threads} "
          f"threads, median of {args.rounds} rounds x {args.repeats}")
    print(f"{'experts':>7s} {'file GB':>8s} {'held/file':>9s} {'deskpod decode':>15s} {'llama.cpp':>10s} {'ratio':>6s} "
          f"{'deskpod prefill':>16s} {'llama.cpp':>10s} {'ratio':>6s}")
    for experts, size, held, summary in rows:
        ours, theirs = summary.get("deskpod"), summary.get("llamacpp")
        line = f"{experts:7d} {size / 1e9:8.2f} {held / size:9.2f} {ours['decode_tok_s']:15.1f}"
        if theirs:
            line += (f" {theirs['decode_tok_s']:10.1f} {ours['decode_tok_s'] / theirs['decode_tok_s']:5.2f}x"
                     f" {ours['prefill_tok_s']:16.1f} {theirs['prefill_tok_s']:10.1f}"
                     f" {ours['prefill_tok_s'] / theirs['prefill_tok_s']:5.2f}x")
        print(line)
    for experts, _, _, summary in rows if args.per_expert else ():
        ours, alone = summary["deskpod"], summary["per-expert"]
        print(f"{experts} experts, deskpod two kernel calls a layer / expert by expert: decode "
              f"{ours['decode_tok_s'] / alone['decode_tok_s']:.2f}x, prefill {ours['prefill_tok_s'] / alone['prefill_tok_s']:.2f}x")
    if len(rows) > 1:
        small, large = rows[0][3]["deskpod"], rows[-1][3]["deskpod"]
        print(f"deskpod decode with {rows[-1][0]} experts / with {rows[0][0]}: "
              f"{large['decode_tok_s'] / small['decode_tok_s']:.2f} (same active parameters per token)")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
