"""Precision schemes: how many bits a weight costs, counting block scales.

A scheme stores the transformer blocks' linear weights (attention and MLP, experts included) at
`body_bits`, and keeps the token embedding and the LM head at higher precision, because both are
sensitive to rounding and cheap next to the body. Bits per weight count the scale that each block
of weights carries:

| scheme | body bits | how the body is stored                                  | embedding / LM head |
|--------|-----------|---------------------------------------------------------|---------------------|
| bf16   | 16        | bfloat16                                                | bf16 / bf16         |
| fp16   | 16        | float16                                                 | fp16 / fp16         |
| f32    | 32        | float32 (what a CPU engine holds after dequantizing)    | f32 / f32           |
| fp8    | 8         | E4M3, one fp32 scale per tensor or row (≈ 0 bits)       | bf16 / bf16         |
| nvfp4  | 4.5       | E2M1 + one E4M3 scale per 16 weights: 4 + 8/16          | fp8 / fp8 (8 bits)  |
| mxfp4  | 4.25      | E2M1 + one E8M0 scale per 32 weights: 4 + 8/32          | fp8 / fp8 (8 bits)  |
| int4   | 4.125     | int4, one fp16 scale per group of 128: 4 + 16/128       | bf16 / bf16         |
| q4_0   | 4.5       | GGUF Q4_0: 32 × 4 bits + one fp16 scale = 18 bytes/32   | Q4_0 / Q6_K (6.5625)|
| q4_k   | 4.5       | GGUF Q4_K: 256 × 4 bits + 6-bit sub-scales + 2 fp16     | Q4_K / Q6_K (6.5625)|
| q8_0   | 8.5       | GGUF Q8_0: 32 × 8 bits + one fp16 scale = 34 bytes/32   | Q8_0 / Q8_0         |

For the 4-bit float formats the 8-bit embedding and head are deskpod's own policy (llama.cpp does the
same for gpt-oss, Q8_0); NVIDIA's ModelOpt checkpoints keep the LM head in bf16, about V·h bytes more.
int4 follows AutoAWQ/GPTQ checkpoints, which leave both in 16 bits. The GGUF rows follow
`llama-quantize`, which stores `output.weight` as Q6_K for the 4-bit types.

`compute` names the tensor-core rate a prefill runs at: FP4 only where the hardware has it, otherwise
the next wider rate (see `Hardware.peak_flops`). NVFP4 runs FP4 GEMMs (TensorRT-LLM, vLLM with
FlashInfer-CUTLASS); MXFP4 and the GGUF and int4 types are expanded to BF16 tiles for the GEMM in
today's engines (llama.cpp and Ollama on DGX Spark run gpt-oss at BF16-class rates, see
benchmarks/plan_accuracy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from deskpod.plan.shape import InvalidPlanInput


@dataclass(frozen=True)
class Scheme:
    name: str
    body_bits: float
    embed_bits: float
    head_bits: float
    compute: str  # "fp4" | "fp8" | "bf16" | "f32": the matmul rate prefill runs at
    layout: str


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("bf16", 16, 16, 16, "bf16", "bfloat16"),
        Scheme("fp16", 16, 16, 16, "bf16", "float16"),
        Scheme("f32", 32, 32, 32, "f32", "float32"),
        Scheme("fp8", 8, 16, 16, "fp8", "E4M3, per-tensor scale; embedding and head bf16"),
        Scheme("nvfp4", 4.5, 8, 8, "fp4", "E2M1 + E4M3 scale per 16; embedding and head fp8"),
        Scheme("mxfp4", 4.25, 8, 8, "bf16", "E2M1 + E8M0 scale per 32; embedding and head fp8"),
        Scheme("int4", 4.125, 16, 16, "bf16", "int4 + fp16 scale per 128; embedding and head bf16"),
        Scheme("q4_0", 4.5, 4.5, 6.5625, "bf16", "GGUF Q4_0; output.weight Q6_K"),
        Scheme("q4_k", 4.5, 4.5, 6.5625, "bf16", "GGUF Q4_K; output.weight Q6_K"),
        Scheme("q8_0", 8.5, 8.5, 8.5, "bf16", "GGUF Q8_0"),
    )
}

# Spellings people use for the same schemes.
ALIASES = {"fp4": "nvfp4", "bfloat16": "bf16", "float16": "fp16", "float32": "f32", "fp32": "f32"}

# Bytes per element of the KV cache.
KV_DTYPES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp8": 1, "f32": 4}

# GGUF `general.file_type` → the scheme that best describes the file (llama_ftype in llama.h).
GGUF_FILE_TYPES: dict[int, str] = {
    0: "f32", 1: "fp16", 2: "q4_0", 7: "q8_0", 14: "q4_k", 15: "q4_k", 32: "bf16", 38: "mxfp4",
}


def get_scheme(name: str) -> Scheme:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SCHEMES:
        raise InvalidPlanInput(f"unknown precision {name!r}; choose one of: {', '.join(SCHEMES)}")
    return SCHEMES[key]


def kv_dtype_bytes(name: str) -> int:
    if name.lower() not in KV_DTYPES:
        raise InvalidPlanInput(f"unknown KV-cache dtype {name!r}; choose one of: {', '.join(KV_DTYPES)}")
    return KV_DTYPES[name.lower()]
