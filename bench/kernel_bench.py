"""Lazy-layer attention alone: our backend vs vLLM's CPU sliding-window kernel.

Times one layer's attention over a paged KV cache, same shapes, same block
table, both with ``sink_tokens=0`` (the semantics they share), then ours with
sinks; checks that the outputs agree. Prints a table with the ratio
``vLLM time / our time`` (above 1: ours is faster).

  python bench/kernel_bench.py                       # SmolLM2 shapes, window 1020
  python bench/kernel_bench.py --contexts 2048,8192 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_lighttransfer.attention.paged import plan_sink_window, sink_window_attention, write_kv  # noqa: E402


def timeit(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def vllm_cpu_attention(args, query, kv_cache, keys, values, slots, qsl, seq_lens, table, window, dtype):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    num_blocks, hkv, bs, _ = kv_cache.shape
    isa = _get_attn_isa(dtype, bs, args.head_size, "auto")
    kv = kv_cache.view(num_blocks, hkv, 2 * bs, -1)
    key_cache, value_cache = kv.chunk(2, dim=2)
    # vLLM's CPU kernel reads its own packing: write the cache with its op.
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.shape[0], num_heads=args.heads, num_kv_heads=hkv,
        head_dim=args.head_size, seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl,
        causal=True, sliding_window_size=window, isa=isa, enable_kv_split=False,
        dynamic_causal=None, kv_cache_dtype="auto",
    )
    out = torch.empty_like(query)

    def run():
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=qsl, seq_lens=seq_lens, scale=args.head_size**-0.5, causal=True,
            alibi_slopes=None, sliding_window=window, block_table=table, softcap=0,
            scheduler_metadata=meta, s_aux=None, dynamic_causal=None,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )
        return out

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefill-chunk", type=int, default=512, help="query tokens per request in the prefill case")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    bs = 32
    torch.manual_seed(0)
    rows = []
    for ctx in map(int, args.contexts.split(",")):
        blocks_per_req = -(-ctx // bs)
        num_blocks = args.batch * blocks_per_req + 1
        table = torch.arange(1, num_blocks, dtype=torch.int32).view(args.batch, -1)
        positions = torch.arange(ctx)
        slots = (table[:, positions // bs].long() * bs + positions % bs).flatten()
        keys = torch.randn(slots.numel(), args.kv_heads, args.head_size).to(dtype)
        values = torch.randn(slots.numel(), args.kv_heads, args.head_size).to(dtype)
        ours_cache = torch.zeros(num_blocks, args.kv_heads, bs, 2 * args.head_size, dtype=dtype)
        write_kv(ours_cache, keys, values, slots)
        vllm_cache = torch.zeros_like(ours_cache)
        seq_lens = torch.full((args.batch,), ctx, dtype=torch.int32)
        for case, q_len in (("decode", 1), (f"prefill chunk {args.prefill_chunk}", args.prefill_chunk)):
            qsl = torch.arange(0, (args.batch + 1) * q_len, q_len, dtype=torch.int32)
            query = torch.randn(args.batch * q_len, args.heads, args.head_size).to(dtype)
            theirs = vllm_cpu_attention(args, query, vllm_cache, keys, values, slots, qsl, seq_lens, table, args.window, dtype)

            def ours_fn(sink):
                out = torch.empty_like(query)

                def run():
                    # The plan is built once per step and shared by all lazy
                    # layers: timed with the layer here (worst case, 1 layer).
                    plan = plan_sink_window(qsl, seq_lens, table, bs, sink, args.window, q_len, ctx, args.kv_heads, args.heads // args.kv_heads)
                    return sink_window_attention(query, ours_cache, plan, args.head_size**-0.5, out)

                return run

            ours0, ours_s = ours_fn(0), ours_fn(args.sink)
            diff = (ours0().float() - theirs().float()).abs().max().item()
            t_theirs = timeit(theirs, args.repeat)
            t_ours0 = timeit(ours0, args.repeat)
            t_ours_s = timeit(ours_s, args.repeat)
            rows.append((ctx, case, t_theirs, t_ours0, t_ours_s, diff))
            print(f"ctx {ctx} {case}: vllm {t_theirs*1e3:.2f} ms, ours {t_ours0*1e3:.2f} ms", flush=True)

    print(f"\nheads {args.heads}/{args.kv_heads} head_size {args.head_size} window {args.window} "
          f"batch {args.batch} {args.dtype}, one layer, median of {args.repeat}, threads {torch.get_num_threads()}\n")
    print("| context | case | vLLM CPU SWA (sink 0) ms | ours sink 0 ms | vLLM/ours | ours sink 4 ms | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for ctx, case, a, b, c, d in rows:
        print(f"| {ctx} | {case} | {a*1e3:.2f} | {b*1e3:.2f} | {a/b:.2f} | {c*1e3:.2f} | {d:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
