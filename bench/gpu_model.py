"""A throughput MODEL of LightTransfer on one GPU: arithmetic, not a measurement.

Decode is memory bound: one step reads the weights once and every running
request's KV cache once. With ``B`` requests at context ``L``:

    step_time  = (weight_bytes + B * kv_read_bytes(L)) / (efficiency * HBM bandwidth)
    tokens/s   = B / step_time
    B          = min(max_num_seqs, floor(kv_pool_bytes / kv_held_bytes(L)))
    kv_pool    = gpu_memory_utilization * memory - weight_bytes - reserve

Per token and layer the KV cache holds ``2 * kv_heads * head_size * dtype``
bytes. A full layer holds and reads ``L`` tokens. A lazy layer holds its
steady-state blocks (``ceil(sink / B) + ceil(window / B) + 1`` blocks, as
``SinkWindowSpec.steady_state_blocks_per_request``) and reads ``sink +
window`` keys. Not modelled: compute (prefill, the GEMMs of large batches),
kernel efficiency differences, the prefill that shares the steps, output
length growing the context, CPU/scheduler overheads, tensor parallelism.
So the figures are upper bounds on the speedup that capacity and bandwidth
allow, for long prompts and short outputs.

  python bench/gpu_model.py                 # Markdown table (H200 and the paper's A100 setting)
  python bench/gpu_model.py --json model.json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    params_b: float  # billions of parameters (weights read once per step, bf16)
    layers: int
    lazy_layers: int
    kv_heads: int
    head_size: int
    sink: int
    window: int


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float  # decimal GB
    bandwidth_tbs: float  # HBM TB/s (decimal)


# Llama-3.1-8B shape (Llama-3-8B's, with a 128K context): half the layers lazy,
# the paper's sink 4 / window 1020. QwQ-32B: configs/qwq-32b-lighttransfer.json.
# Mistral-7B: the paper's throughput model (v0.1 shape: 32 layers, 8 KV heads).
MODELS = [
    ModelShape("Llama-3.1-8B (16/32 lazy)", 8.03, 32, 16, 8, 128, 4, 1020),
    ModelShape("QwQ-32B (32/64 lazy)", 32.76, 64, 32, 8, 128, 129, 1025),
    ModelShape("Mistral-7B (16/32 lazy)", 7.24, 32, 16, 8, 128, 4, 1020),
]
H200 = Gpu("H200", 141.0, 4.8)
A100 = Gpu("A100-80GB", 80.0, 2.0)


@dataclass(frozen=True)
class Assumptions:
    block_size: int = 16  # vLLM's default on CUDA
    kv_bytes: int = 2  # bf16 KV; 1 for --kv-cache-dtype fp8
    weight_bytes_per_param: int = 2  # bf16 weights
    gpu_memory_utilization: float = 0.90  # vLLM's default
    reserve_gb: float = 4.0  # activations, CUDA graphs, sampler workspace
    efficiency: float = 0.80  # fraction of peak HBM bandwidth a decode step reaches
    max_num_seqs: int = 1024  # scheduler cap on running requests


def kv_token_layer_bytes(m: ModelShape, a: Assumptions) -> int:
    return 2 * m.kv_heads * m.head_size * a.kv_bytes


def lazy_tokens_held(m: ModelShape, a: Assumptions, context: int) -> int:
    b = a.block_size
    blocks = math.ceil(m.sink / b) + math.ceil(m.window / b) + 1
    return min(blocks, math.ceil(context / b)) * b


def full_tokens_held(a: Assumptions, context: int) -> int:
    return math.ceil(context / a.block_size) * a.block_size


def predict(m: ModelShape, gpu: Gpu, context: int, converted: bool, a: Assumptions) -> dict:
    per = kv_token_layer_bytes(m, a)
    lazy = m.lazy_layers if converted else 0
    full = m.layers - lazy
    held = per * (full * full_tokens_held(a, context) + lazy * lazy_tokens_held(m, a, context))
    read = per * (full * context + lazy * min(context, m.sink + m.window))
    weights = m.params_b * 1e9 * a.weight_bytes_per_param
    pool = a.gpu_memory_utilization * gpu.memory_gb * 1e9 - weights - a.reserve_gb * 1e9
    capacity = max(0, int(pool // held))
    batch = min(capacity, a.max_num_seqs)
    bandwidth = a.efficiency * gpu.bandwidth_tbs * 1e12
    step_s = (weights + batch * read) / bandwidth if batch else float("inf")
    return {
        "kv_held_gb_per_request": held / 1e9,
        "kv_read_gb_per_request_step": read / 1e9,
        "max_concurrent_requests": capacity,
        "batch": batch,
        "step_ms": step_s * 1e3,
        "tokens_per_s": batch / step_s if batch else 0.0,
    }


def table(gpu: Gpu, models: list[ModelShape], contexts: list[int], a: Assumptions) -> tuple[list[dict], str]:
    rows = []
    lines = [
        f"**{gpu.name}** ({gpu.memory_gb:.0f} GB, {gpu.bandwidth_tbs} TB/s x {a.efficiency:.0%}), "
        f"KV {'bf16' if a.kv_bytes == 2 else 'fp8'}, block {a.block_size}, "
        f"gpu_memory_utilization {a.gpu_memory_utilization}, max_num_seqs {a.max_num_seqs}",
        "",
        "| model | context | max requests full / converted | capacity x | batch full / converted "
        "| tokens/s full / converted | throughput x | step ms full / converted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        for L in contexts:
            full = predict(m, gpu, L, False, a)
            conv = predict(m, gpu, L, True, a)
            cap_x = conv["max_concurrent_requests"] / full["max_concurrent_requests"] if full["max_concurrent_requests"] else float("inf")
            thr_x = conv["tokens_per_s"] / full["tokens_per_s"] if full["tokens_per_s"] else float("inf")
            rows.append({"gpu": gpu.name, "model": m.name, "context": L, "full": full, "converted": conv,
                         "capacity_x": cap_x, "throughput_x": thr_x, "assumptions": asdict(a)})
            lines.append(
                f"| {m.name} | {L // 1024}K | {full['max_concurrent_requests']} / {conv['max_concurrent_requests']} "
                f"| {cap_x:.2f} | {full['batch']} / {conv['batch']} "
                f"| {full['tokens_per_s']:.0f} / {conv['tokens_per_s']:.0f} | {thr_x:.2f} "
                f"| {full['step_ms']:.1f} / {conv['step_ms']:.1f} |"
            )
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--efficiency", type=float, default=Assumptions.efficiency)
    parser.add_argument("--max-num-seqs", type=int, default=Assumptions.max_num_seqs)
    args = parser.parse_args(argv)
    base = Assumptions(efficiency=args.efficiency, max_num_seqs=args.max_num_seqs)
    contexts = [8192, 16384, 32768, 65536, 131072]
    out_rows, parts = [], ["MODEL, not a measurement (see the docstring for what it leaves out).", ""]
    for a in (base, Assumptions(**{**asdict(base), "kv_bytes": 1})):
        rows, md = table(H200, MODELS[:2], contexts, a)
        out_rows += rows
        parts += [md, ""]
    # The paper's setting, for calibration against its published 1.44x / 1.78x / 2.17x / 1.75x.
    rows, md = table(A100, MODELS[2:], [4096, 8192, 16384, 32768], base)
    out_rows += rows
    parts += [md, ""]
    print("\n".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out_rows, f, indent=2)


if __name__ == "__main__":
    main()
