"""One GPU check of the Triton lazy-layer kernel: correctness, speed, CUDA graphs.

Written for an NVIDIA H200 with only PyTorch and Triton (no vLLM, no pytest,
no network; the repository tree copied there). Three sections, each in its
own try/except, under one global time budget (default 420 s):

  (a) correctness: every case of ``CASES`` (the same cases
      ``tests/test_triton.py`` runs through the interpreter) plus larger
      GPU-only ones, against ``reference.reference_attention`` per request
      and ``paged.sink_window_attention`` (the plain-PyTorch path);
  (b) microbenchmark with CUDA events, Llama-3-8B attention shape (32 heads,
      8 KV heads, head 128), block 16: our lazy-layer kernel (sink 4, window
      1020) against full causal attention over the whole context, both as
      torch SDPA (flash) on a contiguous cache and as our paged kernel in
      full mode; decode and a 2048-token prefill chunk; bf16 and fp8 caches;
      eager and replayed from a CUDA graph; also the layer converted per KV
      head, and decode without split-KV and with the finest split;
  (c) CUDA-graph capture of a decode step (KV write + our kernel) with
      persistent buffers, replayed after ``seq_lens``/``query`` change in
      place, compared with eager.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default
``$OUT``, else ``./gpu_check_out``).

  python bench/gpu_check.py                      # on the GPU
  python bench/gpu_check.py --dry-run            # CPU: tiny sizes, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vllm_lighttransfer.reference import reference_attention  # noqa: E402  (torch only)

# --------------------------------------------------------------------------
# Cases: shared with tests/test_triton.py (which loads this file by path).
# Kernel modules are imported lazily (``kernels()``): Triton reads
# TRITON_INTERPRET when a kernel is defined, so callers set it first.
# --------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max abs error allowed against the float32 reference on the kernel's inputs.
# bf16: the kernel rounds the softmax weights P to bf16 for the P.V product
# (as FlashAttention does): up to 2^-9 x the spread of V (about 6 for randn
# values) plus the output's own rounding (2^-9 x |out| <= 0.008); measured
# 0.022 on a head-128 case where the plain-PyTorch path (no P rounding) is
# 0.008 off.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}


@dataclass
class Case:
    name: str
    seq_lens: list[int]  # total length per request, this step's queries included
    q_lens: list[int]  # this step's queries per request (1 = decode)
    sink: int
    window: int  # FULL for plain causal
    heads: int = 4
    kv_heads: int = 2
    head_size: int = 16
    block_size: int = 16
    dtype: str = "float32"  # query (and cache, unless fp8)
    fp8: bool = False  # float8_e4m3fn cache with k_scale / v_scale
    nan_freed: bool = True  # free the blocks no query needs, fill them and block 0 with NaN
    strided: bool = False  # strided cache, query and output views
    pad_reqs: int = 0  # padded requests (0 queries, seq_len 0), as in a captured batch
    pad_tokens: int = 0  # padded query rows past the last request
    seed: int = 0
    scale: float = 0.3
    split_kv: bool | None = None  # the kernel's split_kv: None = its own choice (decode launches split)

    @property
    def tol(self) -> float:
        return TOLERANCE[self.dtype]


FULL = 1 << 30  # triton_sink_window.FULL_WINDOW: plain causal

CASES = [
    # Prefill, decode, chunk and a short prompt (t < sink + window: causal) in
    # one batch; sink 5 ends inside block 0, window 20 is not block-aligned.
    Case("mixed_fp32", [70, 45, 33, 9], [70, 1, 12, 9], sink=5, window=20),
    # The window reaches back into the sinks (query 24: window 15..24, sinks 0..16).
    Case("window_reaches_sinks", [25, 40, 18], [25, 1, 3], sink=17, window=10),
    # No sinks: a plain sliding window; GQA 8 / 2, head 32, block 32.
    Case("sink0_gqa4", [100, 64, 40], [1, 40, 40], sink=0, window=33,
         heads=8, kv_heads=2, head_size=32, block_size=32),
    # Group of 3 (not a power of two) and head size 24 (padded to 32).
    Case("group3_head24", [60, 37], [60, 5], sink=3, window=17, heads=6, kv_heads=2, head_size=24),
    Case("window1_sink1", [30, 7], [30, 1], sink=1, window=1, heads=2, kv_heads=1),
    Case("full_causal", [50, 20], [10, 20], sink=0, window=FULL),
    Case("bf16_mixed", [90, 40, 17], [90, 1, 4], sink=4, window=20, head_size=32, dtype="bfloat16"),
    Case("fp16_decode", [80, 33, 64], [1, 1, 1], sink=4, window=24, dtype="float16"),
    Case("fp8_fp32_query", [75, 30], [75, 1], sink=4, window=21, fp8=True),
    Case("fp8_bf16_query", [75, 30], [6, 1], sink=4, window=21, fp8=True, dtype="bfloat16"),
    Case("strided_views", [66, 20], [66, 1], sink=5, window=20, strided=True),
    Case("padded_batch", [40, 12], [1, 1], sink=2, window=9, pad_reqs=2, pad_tokens=3),
    Case("padded_prefill", [40, 12], [8, 12], sink=2, window=9, pad_reqs=1, pad_tokens=5),
    # Split-KV (decode launches split a tile's keys into segments of whole
    # 64-key tiles, then merge): windows spanning several tiles, sinks longer
    # than a tile (a segment holding sink and window keys), padding.
    Case("split_decode", [400, 280, 90, 40], [1, 1, 1, 1], sink=5, window=300),
    Case("split_decode_long_sink", [450, 300], [1, 1], sink=70, window=260, pad_reqs=2, pad_tokens=3),
    Case("split_decode_bf16_gqa4", [400, 140], [1, 1], sink=4, window=270, heads=8, kv_heads=2,
         head_size=32, dtype="bfloat16"),
    Case("split_decode_fp8", [350, 100], [1, 1], sink=4, window=260, fp8=True),
    Case("split_forced_mixed", [200, 150, 90], [200, 1, 30], sink=66, window=70, split_kv=True),
    Case("split_off_decode", [400, 180], [1, 1], sink=5, window=300, split_kv=False),
]


def random_case(seed: int) -> Case:
    rng = random.Random(seed)
    heads, kv_heads, head_size = rng.choice([(4, 2, 16), (6, 3, 16), (2, 2, 32), (8, 1, 16)])
    seq_lens = [rng.randint(1, 120) for _ in range(rng.randint(1, 4))]
    q_lens = [rng.choice([1, s, rng.randint(1, s)]) for s in seq_lens]
    return Case(
        f"random_{seed}", seq_lens, q_lens,
        sink=rng.choice([0, 1, 3, 5, 17]), window=rng.choice([1, 2, 7, 32, 45, 1000]),
        heads=heads, kv_heads=kv_heads, head_size=head_size,
        block_size=rng.choice([16, 32]), seed=seed,
    )


def kernels():
    """The kernel module and the plain-PyTorch path (import after setting TRITON_INTERPRET)."""
    from vllm_lighttransfer.attention import paged, triton_sink_window

    return triton_sink_window, paged


def needed_positions(seq_len: int, q_len: int, sink: int, window: int) -> tuple[int, int]:
    """Live key positions of one request this step: ``[0, sink)`` and ``[lo, seq_len)``."""
    first_q = seq_len - q_len
    return min(sink, seq_len), max(0, first_q - window + 1)


@dataclass
class Batch:
    case: Case
    query: torch.Tensor  # [T + pad_tokens, H, D] (maybe a strided view)
    kv_cache: torch.Tensor  # [num_blocks, Hkv, B, 2D]
    query_start_loc: torch.Tensor  # [R + pad_reqs + 1] int32
    seq_lens: torch.Tensor  # [R + pad_reqs] int32
    block_table: torch.Tensor  # [R + pad_reqs, max_blocks] int32
    keys: list[torch.Tensor]  # per request [s, Hkv, D] float32, as the kernel reads them
    values: list[torch.Tensor]
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    num_reqs: int  # launched requests (padding included)
    max_query_len: int
    extra: dict = field(default_factory=dict)


def build_batch(case: Case, device: str | torch.device = "cpu") -> Batch:
    tsw, _ = kernels()
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    cache_dtype = torch.float8_e4m3fn if case.fp8 else dtype
    H, Hkv, D, B = case.heads, case.kv_heads, case.head_size, case.block_size
    R = len(case.seq_lens)
    blocks_per_req = [-(-s // B) for s in case.seq_lens]
    num_blocks = sum(blocks_per_req) + 4
    if case.strided:
        # A different physical order: [blocks, block_size, Hkv, 2D] viewed as ours.
        store = torch.zeros(num_blocks, B, Hkv, 2 * D, dtype=cache_dtype, device=device)
        cache = store.permute(0, 2, 1, 3)
    else:
        cache = torch.zeros(num_blocks, Hkv, B, 2 * D, dtype=cache_dtype, device=device)
    k_scale = v_scale = None
    if case.fp8:
        k_scale = torch.tensor([0.02], device=device)
        v_scale = torch.tensor([0.03], device=device)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0: the null block
    table = torch.zeros(R + case.pad_reqs, max(blocks_per_req) + 1, dtype=torch.int32)
    keys, values = [], []
    for r, s in enumerate(case.seq_lens):
        n = blocks_per_req[r]
        table[r, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
        k = torch.randn(s, Hkv, D, generator=gen).to(dtype)
        v = torch.randn(s, Hkv, D, generator=gen).to(dtype)
        pos = torch.arange(s)
        slots = table[r, pos // B].long() * B + pos % B
        tsw.write_kv_quantized(cache, k.to(device), v.to(device), slots.to(device), k_scale, v_scale)
        keys.append(k.float())
        values.append(v.float())
    if case.fp8:
        # The reference sees what the kernel reads: fp8 values times the scale.
        for r, s in enumerate(case.seq_lens):
            pos = torch.arange(s)
            rows = cache[table[r, pos // B].long().to(device), :, (pos % B).to(device)].float().cpu()
            keys[r] = rows[..., :D] * k_scale.cpu()
            values[r] = rows[..., D:] * v_scale.cpu()
    if case.nan_freed:
        nan = float("nan")
        for r, (s, q) in enumerate(zip(case.seq_lens, case.q_lens)):
            sink_end, lo = needed_positions(s, q, case.sink, case.window)
            for b in range(blocks_per_req[r]):
                first, last = b * B, (b + 1) * B - 1
                if first >= sink_end and last < lo:  # no live position in the block
                    cache[int(table[r, b])] = nan
                    table[r, b] = 0
        cache[0] = nan  # vLLM's null block may hold anything
    T = sum(case.q_lens)
    q_all = torch.randn(T + case.pad_tokens, H + 2 * Hkv, D, generator=gen).to(dtype)
    query = q_all[:, :H] if case.strided else q_all[:, :H].contiguous()
    qsl = [0]
    for q in case.q_lens:
        qsl.append(qsl[-1] + q)
    qsl += [qsl[-1]] * case.pad_reqs  # padded requests: zero queries
    seq = list(case.seq_lens) + [0] * case.pad_reqs
    return Batch(
        case=case,
        query=query.to(device),
        kv_cache=cache,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq, dtype=torch.int32, device=device),
        block_table=table.to(device),
        keys=keys,
        values=values,
        k_scale=k_scale,
        v_scale=v_scale,
        num_reqs=R + case.pad_reqs,
        max_query_len=max(case.q_lens),
    )


def new_output(batch: Batch) -> torch.Tensor:
    """NaN-filled output, 2 rows longer than the query: rows past the batch must stay NaN."""
    q = batch.query
    if batch.case.strided:
        store = torch.full((q.shape[0] + 2, q.shape[1] + 3, q.shape[2]), float("nan"), dtype=q.dtype, device=q.device)
        return store[:, 1 : 1 + q.shape[1]]
    return torch.full((q.shape[0] + 2, *q.shape[1:]), float("nan"), dtype=q.dtype, device=q.device)


def run_triton(batch: Batch, output: torch.Tensor | None = None) -> torch.Tensor:
    tsw, _ = kernels()
    c = batch.case
    out = new_output(batch) if output is None else output
    tsw.sink_window_attention_triton(
        batch.query, batch.kv_cache, batch.query_start_loc, batch.seq_lens, batch.block_table,
        c.block_size, c.sink, c.window, c.scale, out, batch.max_query_len, batch.num_reqs,
        k_scale=batch.k_scale, v_scale=batch.v_scale, split_kv=c.split_kv,
    )
    return out


def run_reference(batch: Batch) -> list[torch.Tensor]:
    """float32 reference per request on the kernel's inputs (query rounded to its dtype)."""
    c = batch.case
    qsl = batch.query_start_loc.tolist()
    outs = []
    for r, (s, q) in enumerate(zip(c.seq_lens, c.q_lens)):
        outs.append(reference_attention(
            batch.query[qsl[r] : qsl[r + 1]].float().cpu(), batch.keys[r], batch.values[r],
            torch.arange(s - q, s), torch.arange(s), c.scale,
            None if c.window >= FULL else c.sink, None if c.window >= FULL else c.window,
        ))
    return outs


def run_paged(batch: Batch) -> torch.Tensor:
    """The plain-PyTorch paged path on the same cache (fp8: dequantized to float32 first)."""
    _, paged = kernels()
    c = batch.case
    cache = batch.kv_cache
    query = batch.query
    if c.fp8:
        cache = cache.float()
        cache[..., : c.head_size] *= batch.k_scale
        cache[..., c.head_size :] *= batch.v_scale
        query = query.float()
    R = len(c.seq_lens)
    plan = paged.plan_sink_window(
        batch.query_start_loc[: R + 1], batch.seq_lens[:R], batch.block_table[:R], c.block_size,
        c.sink, min(c.window, max(c.seq_lens) + 1), batch.max_query_len, max(c.seq_lens),
        c.kv_heads, c.heads // c.kv_heads,
    )
    out = torch.zeros(query.shape, dtype=query.dtype, device=query.device)
    T = sum(c.q_lens)
    paged.sink_window_attention(query[:T], cache, plan, c.scale, out)
    return out


def check_batch(batch: Batch, with_paged: bool = True) -> dict:
    """Max errors of the Triton kernel vs the reference (and vs paged); NaN checks."""
    c = batch.case
    out = run_triton(batch)
    refs = run_reference(batch)
    segments = kernels()[0].LAST_LAUNCH.get("segments")
    T = sum(c.q_lens)
    got = out[:T].float().cpu()
    ref = torch.cat(refs)
    result = {
        "case": c.name,
        "segments": segments,
        "max_err_reference": float((got - ref).abs().max()),
        "tol": c.tol,
        "finite": bool(torch.isfinite(got).all()),
        # Rows past the batch (padding, and the 2 spare rows) keep their NaN.
        "untouched_past_batch": bool(torch.isnan(out[T:].float()).all()),
    }
    if with_paged:
        paged_out = run_paged(batch)[:T].float().cpu()
        result["max_err_paged"] = float((got - paged_out).abs().max())
    # fp32 paged path vs Triton: both near-exact; otherwise compare at the case tolerance.
    ok = result["finite"] and result["untouched_past_batch"] and result["max_err_reference"] <= c.tol
    if with_paged:
        ok = ok and result["max_err_paged"] <= 2 * c.tol + 1e-5
    result["ok"] = bool(ok)
    return result


# --------------------------------------------------------------------------
# (a) correctness on the GPU
# --------------------------------------------------------------------------

# Head-128 cases use the models' own scale (1/sqrt(128)); the CPU cases' 0.3
# on 128 dims makes the softmax nearly one-hot over values up to ~4, where one
# bf16 rounding of the output alone is ~0.016.
HEAD128_SCALE = 128 ** -0.5

GPU_CASES = [
    # Llama-3-8B attention shape, paper's sink 4 / window 1020, mixed batch.
    Case("llama8b_mixed_bf16", [3000, 1500, 1030, 700], [512, 1, 1, 700], sink=4, window=1020,
         heads=32, kv_heads=8, head_size=128, dtype="bfloat16", seed=1, scale=HEAD128_SCALE),
    Case("llama8b_mixed_fp8", [3000, 1500, 1030], [300, 1, 1], sink=4, window=1020,
         heads=32, kv_heads=8, head_size=128, dtype="bfloat16", fp8=True, seed=2, scale=HEAD128_SCALE),
    Case("qwq_sink129_window1025", [2500, 1200], [1, 200], sink=129, window=1025,
         heads=40, kv_heads=8, head_size=128, dtype="bfloat16", seed=3, scale=HEAD128_SCALE),
    Case("llama8b_full_causal", [2000, 900], [1, 300], sink=0, window=FULL,
         heads=32, kv_heads=8, head_size=128, dtype="bfloat16", seed=4, scale=HEAD128_SCALE),
    Case("fp32_head64_block32", [1200, 333], [64, 1], sink=7, window=100,
         heads=8, kv_heads=2, head_size=64, block_size=32, seed=5),
    # A per-KV-head conversion's streaming head: one KV head of Llama-3-8B
    # (its 4 query heads), a strided query slice and cache, as
    # model.KVHeadSplitAttention hands them over.
    Case("per_kv_head_llama8b", [3000, 1030, 600], [200, 1, 600], sink=4, window=1020,
         heads=4, kv_heads=1, head_size=128, dtype="bfloat16", strided=True, seed=6, scale=HEAD128_SCALE),
    # Decode batches split the keys (split-KV); forced on a mixed batch too.
    Case("llama8b_decode_split", [3000, 1500, 1030, 700, 5], [1, 1, 1, 1, 1], sink=4, window=1020,
         heads=32, kv_heads=8, head_size=128, dtype="bfloat16", seed=7, scale=HEAD128_SCALE, pad_reqs=3),
    Case("llama8b_mixed_split_forced", [3000, 1500, 700], [300, 1, 700], sink=4, window=1020,
         heads=32, kv_heads=8, head_size=128, dtype="bfloat16", seed=8, scale=HEAD128_SCALE, split_kv=True),
    Case("per_kv_head_decode_split_fp8", [3000, 1030], [1, 1], sink=4, window=1020,
         heads=4, kv_heads=1, head_size=128, dtype="bfloat16", fp8=True, strided=True, seed=9,
         scale=HEAD128_SCALE),
]


def section_correctness(device: str, dry_run: bool, deadline: float, part: dict, save=lambda: None) -> dict:
    """Fills ``part`` as it goes (``save`` writes the report after each case)."""
    # Model-sized cases first on the GPU: the budget may cut the tail.
    cases = ([] if dry_run else list(GPU_CASES)) + list(CASES) + [random_case(s) for s in range(4 if dry_run else 12)]
    results = part.setdefault("cases", [])
    for case in cases:
        if time.monotonic() > deadline:
            results.append({"case": case.name, "ok": None, "error": "skipped: time budget"})
            continue
        try:
            results.append(check_batch(build_batch(case, device)))
        except Exception as exc:  # report and go on
            results.append({"case": case.name, "ok": False, "error": repr(exc)})
        print(f"[gpu_check] {results[-1]}", flush=True)
        save()
    part["all_ok"] = all(r.get("ok") for r in results)
    return part


# --------------------------------------------------------------------------
# (b) microbenchmark
# --------------------------------------------------------------------------

@dataclass
class Shape:
    name: str = "llama3-8b"
    heads: int = 32
    kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16
    sink: int = 4
    window: int = 1020


def timer(device: str):
    """``measure(fn, iters) -> median ms`` with CUDA events (GPU) or perf_counter (CPU dry run)."""
    def measure(fn, iters: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        if device == "cuda":
            torch.cuda.synchronize()
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    return measure


GRAPH_CALLS = 10  # calls captured in one CUDA graph by graph_timer


def graph_timer():
    """``measure(fn, iters) -> median ms per call`` of ``fn`` replayed from a CUDA graph.

    vLLM replays decode steps from CUDA graphs, so what a step costs there
    is the kernels' device time, not the Python launch (0.06-0.1 ms per
    launch on an H200's host, which the eager timing includes). ``GRAPH_CALLS`` calls are
    captured in one graph; each replay is timed with CUDA events.
    """
    def measure(fn, iters: int, warmup: int = 2) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / GRAPH_CALLS)
        del graph
        return statistics.median(times)
    return measure


def paged_layout(batch: int, context: int, q_len: int, shape: Shape, live: str, device: str, cache_dtype, gen):
    """Block table and cache for ``batch`` requests of ``context`` tokens.

    ``live="all"``: every block real (full attention). ``live="sink_window"``:
    only the sink blocks and the blocks this step's window needs are real; the
    rest point at the null block 0, as the sink + window manager leaves them.
    Blocks are shuffled (no locality a real allocator would not give).
    """
    B = shape.block_size
    nb = -(-context // B)
    if live == "all":
        per_req = list(range(nb))
    else:
        sink_end, lo = needed_positions(context, q_len, shape.sink, shape.window)
        per_req = [b for b in range(nb) if b * B < sink_end or (b + 1) * B - 1 >= lo]
    num_blocks = 1 + batch * len(per_req)
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).to(torch.int32)
    table = torch.zeros(batch, nb, dtype=torch.int32)
    cols = torch.tensor(per_req, dtype=torch.long)
    table[:, cols] = ids.view(batch, len(per_req))
    cache = torch.empty(num_blocks, shape.kv_heads, B, 2 * shape.head_size, dtype=torch.bfloat16, device=device)
    cache.normal_()
    if cache_dtype == torch.float8_e4m3fn:
        cache = (cache * 4).to(torch.float8_e4m3fn)
    return cache, table.to(device)


def bench_one(measure, tsw, shape: Shape, batch: int, context: int, q_len: int, kv: str, device: str, iters: int,
              gmeasure=None) -> dict:
    """One row: lazy kernel, paged full kernel, SDPA full (bf16 only). Times in ms.

    With ``gmeasure`` (CUDA), each variant is also timed replayed from a CUDA
    graph (``*_graph_ms``): its device time, as vLLM's captured decode runs it.
    """
    gen = torch.Generator().manual_seed(0)
    H, Hkv, D = shape.heads, shape.kv_heads, shape.head_size
    cache_dtype = torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16
    scale = D ** -0.5
    T = batch * q_len
    query = torch.randn(T, H, D, generator=gen).to(torch.bfloat16).to(device)
    qsl = (torch.arange(batch + 1, dtype=torch.int32) * q_len).to(device)
    seq = torch.full((batch,), context, dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    ks = torch.tensor([0.25], device=device)
    vs = torch.tensor([0.25], device=device)
    row = {"batch": batch, "context": context, "q_len": q_len, "kv": kv}
    kv_bytes_token = 2 * Hkv * D * (1 if kv == "fp8" else 2)

    cache, table = paged_layout(batch, context, q_len, shape, "sink_window", device, cache_dtype, gen)
    def lazy_launch(split_kv=None):
        """One lazy-layer call on this row's batch; ``split_kv`` as the kernel takes it."""
        return lambda: tsw.sink_window_attention_triton(
            query, cache, qsl, seq, table, shape.block_size, shape.sink, shape.window, scale, out,
            q_len, batch, ks, vs, split_kv=split_kv)

    lazy = lazy_launch()
    row["lazy_ms"] = measure(lazy, iters)
    row["segments"] = tsw.LAST_LAUNCH.get("segments")
    if gmeasure:
        row["lazy_graph_ms"] = gmeasure(lazy, iters)
    if row["segments"] and row["segments"] > 1:
        # The same launch without split-KV: what the segments buy.
        row["nosplit_lazy_ms"] = measure(lazy_launch(False), iters)
        if gmeasure:
            row["nosplit_lazy_graph_ms"] = gmeasure(lazy_launch(False), iters)
            # The finest split (segments of one 64-key tile, up to MAX_SEGMENTS).
            row["maxsplit_lazy_graph_ms"] = gmeasure(lazy_launch(True), iters)
            row["maxsplit_segments"] = tsw.LAST_LAUNCH.get("segments")
    keys_read = min(context, shape.sink + shape.window + q_len - 1)
    row["lazy_GBps"] = batch * keys_read * kv_bytes_token / (row["lazy_ms"] * 1e-3) / 1e9
    # The same layer converted per KV head (model.KVHeadSplitAttention): one
    # launch per KV head, each on that head's query slice and one-head cache.
    group = H // Hkv
    head_caches = [cache[:, h : h + 1] for h in range(Hkv)]

    def per_head():
        for h in range(Hkv):
            tsw.sink_window_attention_triton(
                query[:, h * group : (h + 1) * group], head_caches[h], qsl, seq, table, shape.block_size,
                shape.sink, shape.window, scale, out[:, h * group : (h + 1) * group], q_len, batch, ks, vs)
    row["per_head_lazy_ms"] = measure(per_head, iters)
    if gmeasure:
        row["per_head_lazy_graph_ms"] = gmeasure(per_head, iters)
    del cache, table, head_caches

    cache, table = paged_layout(batch, context, q_len, shape, "all", device, cache_dtype, gen)
    full = lambda: tsw.paged_causal_attention_triton(  # noqa: E731
        query, cache, qsl, seq, table, shape.block_size, scale, out, q_len, batch, ks, vs)
    row["paged_full_ms"] = measure(full, max(2, iters // 2))
    if gmeasure:
        row["paged_full_graph_ms"] = gmeasure(full, max(2, iters // 2))
    row["paged_full_GBps"] = batch * context * kv_bytes_token / (row["paged_full_ms"] * 1e-3) / 1e9
    del cache, table

    if kv == "bf16":
        try:
            row["sdpa_full_ms"], note = bench_sdpa(measure, shape, batch, context, q_len, device, max(2, iters // 2), gen)
            if note:
                row["sdpa_note"] = note
            if gmeasure and not note:
                try:
                    row["sdpa_full_graph_ms"], _ = bench_sdpa(gmeasure, shape, batch, context, q_len, device,
                                                              max(2, iters // 2), gen)
                except Exception as exc:  # capture refused: the eager figure stays
                    row["sdpa_graph_error"] = repr(exc)[:200]
            row["sdpa_full_GBps"] = batch * context * kv_bytes_token / (row["sdpa_full_ms"] * 1e-3) / 1e9
        except Exception as exc:
            row["sdpa_error"] = repr(exc)[:200]
    base = row.get("sdpa_full_ms", row["paged_full_ms"])
    row["speedup_vs_full"] = base / row["lazy_ms"]
    if "lazy_graph_ms" in row:
        gbase = row.get("sdpa_full_graph_ms", row["paged_full_graph_ms"])
        row["graph_speedup_vs_full"] = gbase / row["lazy_graph_ms"]
        row["graph_lazy_over_full"] = row["lazy_graph_ms"] / gbase
        row["graph_lazy_GBps"] = batch * keys_read * kv_bytes_token / (row["lazy_graph_ms"] * 1e-3) / 1e9
    return row


def bench_sdpa(measure, shape: Shape, batch: int, context: int, q_len: int, device: str, iters: int, gen) -> float:
    """torch SDPA over a contiguous cache: the full-attention layer's best case (no paging)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, Hkv, D = shape.heads, shape.kv_heads, shape.head_size
    q = torch.randn(batch, H, q_len, D, generator=gen).to(torch.bfloat16).to(device)
    k = torch.empty(batch, Hkv, context, D, dtype=torch.bfloat16, device=device).normal_()
    v = torch.empty_like(k).normal_()
    mask = None
    if q_len > 1:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, context)  # this chunk sits at the end of the context
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

    def fn():
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    try:
        return measure(fn, iters), ""
    except Exception as exc:
        if mask is None:
            raise
        # No fused kernel for the lower-right causal mask with GQA here: time
        # the chunk without the mask (it then reads every key for every
        # query: an upper bound, within 2048 / context of the causal cost).
        mask = None
        return measure(fn, iters), f"SDPA without causal mask (upper bound): {exc!r}"[:200]


def bench_plan(dry_run: bool) -> list[tuple[int, int, int, str]]:
    """(batch, context, q_len, kv) rows, most informative first (the budget may cut the tail)."""
    if dry_run:
        return [(1, 300, 1, "bf16"), (2, 300, 1, "fp8"), (1, 300, 64, "bf16")]
    rows = []
    for context in (8192, 32768, 131072):
        for batch in (1, 8, 64):
            if batch * context > (1 << 21):  # 2M tokens: 8 GiB per bf16 copy of one layer's KV
                batch = (1 << 21) // context
            rows.append((batch, context, 1, "bf16"))
    for context in (8192, 32768, 131072):
        rows.append((1, context, 2048, "bf16"))
    for context in (32768, 131072):
        rows.append((16, context, 1, "fp8"))
        rows.append((1, context, 2048, "fp8"))
    # dedupe, keep order
    seen, out = set(), []
    for r in rows:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def section_bench(device: str, dry_run: bool, deadline: float, part: dict, save=lambda: None) -> dict:
    """Fills ``part`` as it goes (``save`` writes the report after each row)."""
    tsw, _ = kernels()
    shape = Shape() if not dry_run else Shape("dry-run-tiny", heads=4, kv_heads=2, head_size=32, sink=4, window=60)
    measure = timer(device)
    part["shape"] = asdict(shape)
    rows = part.setdefault("rows", [])
    for batch, context, q_len, kv in bench_plan(dry_run):
        if time.monotonic() > deadline:
            rows.append({"batch": batch, "context": context, "q_len": q_len, "kv": kv, "error": "skipped: time budget"})
            continue
        try:
            rows.append(bench_one(measure, tsw, shape, batch, context, q_len, kv, device, 3 if dry_run else 20,
                                  graph_timer() if device == "cuda" else None))
        except Exception as exc:
            rows.append({"batch": batch, "context": context, "q_len": q_len, "kv": kv, "error": repr(exc)[:300]})
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"[gpu_check] {rows[-1]}", flush=True)
        save()
    return part


# --------------------------------------------------------------------------
# (c) CUDA graph capture and replay of a decode step
# --------------------------------------------------------------------------

def section_cuda_graph(device: str, dry_run: bool) -> dict:
    """On CUDA: capture and replay. In a CPU dry run: the same persistent-buffer
    steps run eagerly (no graph), to exercise the step logic and its reference check."""
    tsw, _ = kernels()
    results = []
    for kv in ("bf16", "fp8"):
        try:
            results.append(graph_check(tsw, kv, device, dry_run))
        except Exception as exc:
            results.append({"kv": kv, "ok": False, "error": repr(exc)[:300], "trace": traceback.format_exc()[-800:]})
    out = {"results": results, "all_ok": all(r.get("ok") for r in results)}
    if device != "cuda":
        out["note"] = "no CUDA device (dry run): steps ran eagerly, nothing was captured"
    return out


def graph_check(tsw, kv: str, device: str = "cuda", dry_run: bool = False) -> dict:
    """Capture KV write + kernel for a padded decode batch; replay across steps; compare to eager.

    Each step writes one new token per request and attends; ``seq_lens``,
    the slots, the query and the new keys change in place between replays.
    The graph's output must equal eager's bit for bit, and the last step's
    output must match the reference on the (dequantized) cache.
    """
    capture = device == "cuda"
    shape = Shape() if not dry_run else Shape("dry-run-tiny", heads=4, kv_heads=2, head_size=32, sink=4, window=60)
    H, Hkv, D, B = shape.heads, shape.kv_heads, shape.head_size, shape.block_size
    real, padded = 6, 8  # vLLM pads the batch to a captured size
    lo_len, hi_len, jump, steps = (1000, 3000, 37, 5) if not dry_run else (50, 150, 9, 2)
    max_ctx = hi_len + jump * steps + B
    cache_dtype = torch.float8_e4m3fn if kv == "fp8" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    nb = -(-max_ctx // B)
    num_blocks = 1 + real * nb
    cache = torch.zeros(num_blocks, Hkv, B, 2 * D, dtype=cache_dtype, device=device)
    table = torch.zeros(padded, nb, dtype=torch.int32)
    table[:real] = (torch.randperm(num_blocks - 1, generator=gen)[: real * nb] + 1).view(real, nb).to(torch.int32)
    table = table.to(device)
    ks = torch.tensor([0.05], device=device)
    vs = torch.tensor([0.05], device=device)
    # Prompt history, written eagerly.
    lens = torch.randint(lo_len, hi_len, (real,), generator=gen)
    for r in range(real):
        n = int(lens[r])
        pos = torch.arange(n)
        slots = (table[r].cpu()[pos // B].long() * B + pos % B).to(device)
        k = torch.randn(n, Hkv, D, generator=gen).to(torch.bfloat16).to(device)
        v = torch.randn(n, Hkv, D, generator=gen).to(torch.bfloat16).to(device)
        tsw.write_kv_quantized(cache, k, v, slots, ks, vs)
    # Persistent buffers of the captured step.
    query = torch.zeros(padded, H, D, dtype=torch.bfloat16, device=device)
    new_k = torch.zeros(padded, Hkv, D, dtype=torch.bfloat16, device=device)
    new_v = torch.zeros_like(new_k)
    slot_mapping = torch.full((padded,), -1, dtype=torch.long, device=device)
    qsl = torch.tensor(list(range(real + 1)) + [real] * (padded - real), dtype=torch.int32, device=device)
    seq_lens = torch.zeros(padded, dtype=torch.int32, device=device)
    out = torch.zeros(padded, H, D, dtype=torch.bfloat16, device=device)
    scale = D ** -0.5

    def step(o):
        tsw.write_kv_quantized(cache, new_k, new_v, slot_mapping, ks, vs)
        tsw.sink_window_attention_triton(query, cache, qsl, seq_lens, table, B, shape.sink, shape.window,
                                         scale, o, 1, padded, ks, vs)

    def fill(step_idx: int):
        pos = lens + step_idx  # position of this step's token
        seq_lens[:real].copy_((pos + 1).to(torch.int32))
        slots = table[:real].cpu().gather(1, (pos // B).view(-1, 1)).view(-1).long() * B + pos % B
        slot_mapping[:real].copy_(slots)
        query.copy_(torch.randn(padded, H, D, generator=gen).to(torch.bfloat16))
        new_k.copy_(torch.randn(padded, Hkv, D, generator=gen).to(torch.bfloat16))
        new_v.copy_(torch.randn(padded, Hkv, D, generator=gen).to(torch.bfloat16))

    fill(0)
    if capture:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(out)  # warm-up: compile outside the capture
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(out)
        replay = graph.replay
    else:
        replay = lambda: step(out)  # noqa: E731

    def sync():
        if capture:
            torch.cuda.synchronize()

    max_diff = 0.0
    eager_out = torch.zeros_like(out)
    for i in range(1, steps + 1):
        fill(i * jump)  # jump ahead: contexts grow across block edges
        replay()
        sync()
        graph_out = out[:real].clone()
        # Eager on the same inputs (the write is idempotent: same slots, same values).
        step(eager_out)
        sync()
        max_diff = max(max_diff, float((graph_out.float() - eager_out[:real].float()).abs().max()))
    finite = bool(torch.isfinite(out[:real].float()).all())
    # The last step against the reference, on the cache as the kernel reads it.
    ref_err = 0.0
    host_table = table.cpu()
    for r in range(real):
        n = int(seq_lens[r])
        pos = torch.arange(n)
        rows = cache[host_table[r, pos // B].long().to(device), :, (pos % B).to(device)].float().cpu()
        k, v = rows[..., :D], rows[..., D:]
        if kv == "fp8":
            k, v = k * ks.cpu(), v * vs.cpu()
        ref = reference_attention(query[r : r + 1].float().cpu(), k, v, torch.tensor([n - 1]), pos, scale,
                                  shape.sink, shape.window)
        ref_err = max(ref_err, float((out[r : r + 1].float().cpu() - ref).abs().max()))
    result = {"kv": kv, "captured": capture, "ok": max_diff == 0.0 and finite and ref_err <= TOLERANCE["bfloat16"],
              "max_abs_diff_graph_vs_eager": max_diff, "max_err_reference": ref_err,
              "steps": steps, "batch": f"{real} real / {padded} padded"}
    if capture:
        measure = timer("cuda")
        result["replay_ms"] = measure(graph.replay, 50)  # write + attention
        result["eager_ms"] = measure(lambda: step(eager_out), 50)
    return result


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = ["# GPU check: LightTransfer Triton kernel", ""]
    env = report["env"]
    lines.append(f"Device: {env.get('device')}; torch {env.get('torch')}; triton {env.get('triton')}; "
                 f"dry run: {env.get('dry_run')}; wall {report.get('wall_s', 0):.0f} s.")
    lines.append("")
    corr = report.get("correctness", {})
    lines.append(f"## (a) Correctness: all ok = {corr.get('all_ok')}")
    lines.append("")
    lines.append("| case | ok | max err vs reference | tol | max err vs paged.py | error |")
    lines.append("|---|---|---|---|---|---|")
    for r in corr.get("cases", []):
        lines.append(f"| {r['case']} | {r.get('ok')} | {r.get('max_err_reference', '')} | {r.get('tol', '')} "
                     f"| {r.get('max_err_paged', '')} | {r.get('error', '')} |")
    if "error" in corr:
        lines.append(f"\nSection error: {corr['error']}")
    b = report.get("bench", {})
    lines += ["", "## (b) Microbenchmark (one layer's attention, median ms, CUDA events)", ""]
    if b.get("shape"):
        lines.append(f"Shape: {b['shape']}. Lazy = our kernel, sink + window over the paged cache; "
                     "paged full = our kernel in full-causal mode; SDPA full = torch flash on a contiguous "
                     "cache (bf16 only); lazy per KV head = the same layer converted per KV head "
                     "(one launch per KV head). Speedup = SDPA full (else paged full) / lazy.")
        lines.append("")
    lines.append("| kv | batch | context | q_len | lazy ms | lazy per KV head ms | paged full ms | SDPA full ms | speedup "
                 "| lazy GB/s | paged full GB/s | error |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
    for r in b.get("rows", []):
        lines.append(
            f"| {r['kv']} | {r['batch']} | {r['context']} | {r['q_len']} | {fmt(r.get('lazy_ms'))} "
            f"| {fmt(r.get('per_head_lazy_ms'))} | {fmt(r.get('paged_full_ms'))} | {fmt(r.get('sdpa_full_ms'))} | {fmt(r.get('speedup_vs_full'))} "
            f"| {fmt(r.get('lazy_GBps'))} | {fmt(r.get('paged_full_GBps'))} | {r.get('error', r.get('sdpa_error', r.get('sdpa_note', '')))} |")
    graph_rows = [r for r in b.get("rows", []) if "lazy_graph_ms" in r]
    if graph_rows:
        lines += ["", f"Replayed from a CUDA graph ({GRAPH_CALLS} calls per graph, median ms per call): device "
                  "time, as vLLM's captured decode runs it. lazy / full = lazy over SDPA full (else paged full).", "",
                  "| kv | batch | context | q_len | segments | lazy ms | lazy unsplit ms | lazy finest split ms "
                  "| lazy per KV head ms | paged full ms | SDPA full ms | lazy / full | window / context | lazy GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        sw = b["shape"]["sink"] + b["shape"]["window"]
        for r in graph_rows:
            lines.append(
                f"| {r['kv']} | {r['batch']} | {r['context']} | {r['q_len']} | {r.get('segments')} "
                f"| {fmt(r.get('lazy_graph_ms'))} | {fmt(r.get('nosplit_lazy_graph_ms'))} "
                f"| {fmt(r.get('maxsplit_lazy_graph_ms'))} ({r.get('maxsplit_segments', '')}) "
                f"| {fmt(r.get('per_head_lazy_graph_ms'))} | {fmt(r.get('paged_full_graph_ms'))} "
                f"| {fmt(r.get('sdpa_full_graph_ms'))} | {fmt(r.get('graph_lazy_over_full'))} "
                f"| {fmt(min(1.0, sw / r['context']))} | {fmt(r.get('graph_lazy_GBps'))} |")
    if "error" in b:
        lines.append(f"\nSection error: {b['error']}")
    g = report.get("cuda_graph", {})
    lines += ["", "## (c) CUDA graph: decode step (KV write + kernel) captured, replayed, vs eager", ""]
    if "note" in g:
        lines.append(f"Note: {g['note']}")
    for r in g.get("results", []):
        lines.append(f"- {r.get('kv')}: ok={r.get('ok')} captured={r.get('captured')} "
                     f"max|graph-eager|={r.get('max_abs_diff_graph_vs_eager')} "
                     f"max err vs reference={r.get('max_err_reference')} "
                     f"replay {fmt(r.get('replay_ms'))} ms, eager {fmt(r.get('eager_ms'))} ms, "
                     f"{r.get('batch', '')} {r.get('error', '')}")
    if "error" in g:
        lines.append(f"\nSection error: {g['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder")
    parser.add_argument("--budget-s", type=float, default=420.0, help="global time budget (seconds)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny sizes through Triton's interpreter")
    parser.add_argument("--sections", default="correctness,bench,cuda_graph")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu":
        # Before the kernel module is imported: Triton reads it when kernels are defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    start = time.monotonic()
    deadline = start + args.budget_s
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    report: dict = {"env": {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                            "torch": torch.__version__, "dry_run": args.dry_run, "python": platform.python_version()}}
    try:
        import triton

        report["env"]["triton"] = triton.__version__
    except ImportError as exc:
        report["env"]["triton"] = f"missing: {exc}"

    def save():
        report["wall_s"] = time.monotonic() - start
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out_dir / "gpu_check.md").write_text(markdown(report))

    # Correctness gets up to 35% of the budget, the benchmark what is left
    # minus 60 s kept for the CUDA-graph check.
    # Sections fill their part of the report as they go, and it is saved
    # after every case and row: a run cut short still leaves its results.
    plan = [
        ("correctness", lambda part: section_correctness(
            device, args.dry_run, start + 0.35 * args.budget_s, part, save)),
        ("bench", lambda part: section_bench(device, args.dry_run, deadline - 60, part, save)),
        ("cuda_graph", lambda part: section_cuda_graph(device, args.dry_run)),
    ]
    for name, fn in plan:
        if name not in sections:
            continue
        t = time.monotonic()
        if t > deadline:
            report[name] = {"error": "skipped: time budget"}
            continue
        report[name] = {}
        try:
            report[name] = fn(report[name])
        except Exception as exc:
            report[name] = {"error": repr(exc)[:500], "trace": traceback.format_exc()[-2000:]}
        report[name]["section_s"] = time.monotonic() - t
        save()
        print(f"[gpu_check] {name}: {time.monotonic() - t:.1f} s", flush=True)
    save()
    print((out_dir / "gpu_check.md").read_text())
    # Every check section that was asked for must have run and passed (an
    # exception or the time budget leaves no all_ok: a failure).
    ok = all(report[name].get("all_ok") for name in ("correctness", "cuda_graph") if name in report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
