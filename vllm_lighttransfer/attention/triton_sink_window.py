"""Sink + window attention over the paged KV cache, as one Triton kernel.

What it does
    ``sink_window_attention_triton`` runs LightTransfer's lazy-layer attention
    for one step's whole batch (prefill, chunked prefill, decode, or a mix)
    in a single launch, reading keys and values in place through the block
    table: no gathered copy, no per-step plan. One program handles one query
    tile of one request (``BLOCK_Q`` consecutive query tokens) for one KV
    head; the query heads sharing that KV head are folded into the tile's
    rows (``BLOCK_M = BLOCK_Q * group`` rows, padded to a power of two), so
    each key tile is loaded once per KV head. The program walks two key
    ranges with an online softmax in float32:

    - the sink part: positions ``[0, min(sink, last_query + 1))``;
    - the window part: positions ``[max(sink, first_query - window + 1),
      last_query]``.

    ``paged_causal_attention_triton`` is the same kernel with the sinks off
    and an unbounded window: plain paged causal attention, the full-layer
    baseline of the GPU benchmark. ``write_kv_quantized`` writes keys and
    values into the cache, quantizing (``key / k_scale``, saturated) where
    the cache is ``float8_e4m3fn``.

Semantics
    Query at position ``t`` attends to key ``k`` iff
    ``k <= t and (k < sink or k > t - window)`` (``reference.py``). The two
    ranges do not overlap (the window part starts at ``sink`` or later), so
    where the window reaches back into the sinks every key counts once.
    Query ``j`` of request ``r`` sits at position
    ``seq_lens[r] - q_len[r] + j`` (vLLM's ``CommonAttentionMetadata``).

Cost
    A tile of ``Q`` queries reads at most ``sink + window + Q - 1`` keys per
    KV head, whatever the context length: decode reads ``sink + window``
    keys, prefill of ``L`` tokens costs ``O(L * (sink + window))``. Keys are
    loaded once per KV head (GQA folded into rows); scores, the softmax and
    the accumulator stay in float32 registers.

Layout
    ``kv_cache`` is our layout (``paged.write_kv``): ``[num_blocks,
    num_kv_heads, block_size, 2 * head_size]``, the key in
    ``[..., :head_size]`` and the value in ``[..., head_size:]``; any
    strides (all four are passed to the kernel). ``query [T, H, D]`` and
    ``output [>= T, H, D]`` may be strided too. ``block_table [R,
    max_blocks]`` int32; entries of freed blocks point at block 0 (vLLM's
    null block), which may hold anything, NaN included: every key load is
    masked to the two ranges above, whose blocks the sink + window manager
    keeps, so freed blocks are never read, and masked lanes load 0 (never
    ``0 * NaN``). bf16, fp16 and fp32 caches are read as they are; a
    ``float8_e4m3fn`` cache is dequantized as ``value * scale`` with
    per-layer ``k_scale`` / ``v_scale`` float tensors (vLLM's
    ``--kv-cache-dtype fp8``).

Split-KV (decode)
    A decode program alone walks up to ``sink + window`` keys one 64-key
    tile after another: about 43 us for 1024 keys on an H200 whatever the
    batch, slower than flash attention over 32K keys at batch 1
    (bench/GPU.md). Decode launches (``max_query_len`` 1) therefore cut a
    tile's keys (the sink part, then the window part) into segments
    (``split_segments``: whole tiles, at least 128 keys, at most 16, as
    many as reach about 1024 programs); each program writes its partial
    softmax state (max, sum, float32 accumulator) and
    ``_combine_segments`` merges them per (token, query head). 2.7x faster
    at batch 1, 2.2x at batch 8 (H200). Prefill tiles never split.

CUDA graphs
    The launch grid is ``(T // BLOCK_Q + num_reqs, num_kv_heads,
    segments)`` where ``T = query.shape[0]`` and ``num_reqs`` are the host
    integers vLLM pads for a captured batch, ``BLOCK_Q`` depends only on
    whether ``max_query_len > 1`` and the head grouping, and the segments
    on those and the sink and window: the grid never depends on device
    data. Each program finds its request by a binary search over
    ``query_start_loc`` on the device; programs past the last request's
    tiles (padding) return at once, and padded requests (zero queries) do
    nothing. No ``.item()``, no host sync; the only allocation is the
    split's partial buffers, which a capture takes from its graph's pool. A
    captured launch replays correctly after ``seq_lens``,
    ``query_start_loc`` and ``block_table`` are updated in place (checked on
    an H200: graph == eager bit for bit). Scales are read from device
    tensors for the same reason.

Limitations
    The full-attention variant (``paged_causal_attention_triton``, a
    benchmark baseline, not a product path) never splits: slow at batch 1
    over 100K+ tokens. No software pipelining of the key loop. No ALiBi,
    soft-capping, learned sinks or fused output quantization.
    Importing this module needs only torch (paged.py too, for the KV
    write); without Triton ``HAS_TRITON`` is False and the attention
    entries raise.
"""

from __future__ import annotations

import torch

from vllm_lighttransfer.attention.paged import write_kv

try:  # Triton is optional: the plain-PyTorch path (paged.py) runs without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

# Window of the full-causal variant: larger than any context, small enough
# that ``position - window`` stays well inside int32.
FULL_WINDOW = 1 << 30

FP8_E4M3_MAX = 448.0

# Launch shape. Query rows per program (query tokens x query heads per KV
# head): 16 in decode (one token, up to 16 heads), 64 in prefill so a key
# tile serves 64 / group query tokens. Keys per inner step: 64.
DECODE_BLOCK_M = 16
PREFILL_BLOCK_M = 64
TILE_N = 64

# Split-KV in decode launches: the keys of a tile are cut into segments of
# at least SEGMENT_MIN_TILES * TILE_N keys, at most MAX_SEGMENTS of them,
# as many as it takes to reach SPLIT_TARGET_PROGRAMS programs (an H200 has
# 132 multiprocessors). Measured on an H200 (bench/GPU.md): without it a
# decode program walks its sink + window keys alone, about 43 us for 1024
# keys whatever the batch, slower than flash attention over 32K keys at
# batch 1.
SEGMENT_MIN_TILES = 2
MAX_SEGMENTS = 16
SPLIT_TARGET_PROGRAMS = 1024

# The last launch's grid and split (host values; tests and benchmarks read it).
LAST_LAUNCH: dict = {}


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if HAS_TRITON:

    @triton.jit
    def _attend_range(
        m_i,
        l_i,
        acc,
        q,
        q_pos,
        row_valid,
        k_lo,
        k_hi,  # keys [k_lo, k_hi), k_hi exclusive
        window,
        kv_ptr,
        bt_row_ptr,
        stride_bt_1,
        block_size,
        kv_head,
        stride_c0,
        stride_c1,
        stride_c2,
        stride_c3,
        k_scale,
        v_scale,
        qk_scale,  # softmax scale * log2(e)
        HEAD_SIZE: tl.constexpr,
        HEAD_PAD: tl.constexpr,
        TILE: tl.constexpr,
        KV_FP8: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        offs_n = tl.arange(0, TILE)
        offs_d = tl.arange(0, HEAD_PAD)
        d_mask = offs_d < HEAD_SIZE
        head_base = kv_ptr + kv_head.to(tl.int64) * stride_c1
        for start in range(k_lo, k_hi, TILE):
            k_pos = start + offs_n  # [TILE]
            k_mask = k_pos < k_hi
            # Physical block of each key; masked lanes read nothing and get
            # block 0, whose contents they never load either.
            blk = tl.load(bt_row_ptr + (k_pos // block_size) * stride_bt_1, mask=k_mask, other=0)
            slot_ptr = head_base + blk.to(tl.int64) * stride_c0 + (k_pos % block_size).to(tl.int64) * stride_c2
            k_t = tl.load(
                slot_ptr[None, :] + offs_d[:, None] * stride_c3,
                mask=d_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # [HEAD_PAD, TILE]
            v = tl.load(
                slot_ptr[:, None] + (HEAD_SIZE + offs_d[None, :]) * stride_c3,
                mask=k_mask[:, None] & d_mask[None, :],
                other=0.0,
            )  # [TILE, HEAD_PAD]
            if KV_FP8:
                k_t = (k_t.to(tl.float32) * k_scale).to(q.dtype)
                v = (v.to(tl.float32) * v_scale).to(q.dtype)
            else:
                k_t = k_t.to(q.dtype)
                v = v.to(q.dtype)
            if UPCAST:
                s = tl.dot(q.to(tl.float32), k_t.to(tl.float32), input_precision="ieee")
            elif IEEE:
                s = tl.dot(q, k_t, input_precision="ieee")
            else:
                s = tl.dot(q, k_t)
            s = s * qk_scale  # [BLOCK_M, TILE] float32, log2 domain
            allowed = (
                row_valid[:, None]
                & k_mask[None, :]
                & (k_pos[None, :] <= q_pos[:, None])
                & (k_pos[None, :] > q_pos[:, None] - window)
            )
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows with no allowed key yet keep m = -inf: subtract 0 instead,
            # so exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if UPCAST:
                # Same rounding of p as on the GPU path, then an fp32 product.
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            elif IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _sink_window_kernel(
        out_ptr,
        q_ptr,
        kv_ptr,
        qsl_ptr,  # [R + 1] int32
        seq_lens_ptr,  # [R] int32
        bt_ptr,  # [R, max_blocks] int32
        k_scale_ptr,
        v_scale_ptr,
        scale,
        sink_tokens,
        window_tokens,
        num_reqs,
        block_size,
        stride_qt,
        stride_qh,
        stride_qd,
        stride_ot,
        stride_oh,
        stride_od,
        stride_c0,
        stride_c1,
        stride_c2,
        stride_c3,
        stride_bt_0,
        stride_bt_1,
        part_m_ptr,  # [T, H, NUM_SEG] float32 (split-KV only)
        part_l_ptr,  # [T, H, NUM_SEG] float32
        part_acc_ptr,  # [T, H, NUM_SEG, HEAD_SIZE] float32
        seg_keys,  # keys per segment (a multiple of TILE)
        GROUP: tl.constexpr,
        HEAD_SIZE: tl.constexpr,
        HEAD_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr,
        TILE: tl.constexpr,
        KV_FP8: tl.constexpr,
        IEEE: tl.constexpr,
        UPCAST: tl.constexpr,
        NUM_SEG: tl.constexpr,
        NUM_HEADS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)
        seg = tl.program_id(2)

        # Request of this tile: the largest r with
        # qsl[r] // BLOCK_Q + r <= pid (tile r's first global index; the
        # "+ r" makes room for each request's partial last tile).
        # int32 tensors from the start, so the loop-carried variables keep
        # one type even where Triton turns num_reqs == 1 into a constant.
        lo = pid * 0
        hi = pid * 0 + num_reqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
                lo = mid + 1
            else:
                hi = mid
        req = lo - 1
        q_start = tl.load(qsl_ptr + req)
        q_len = tl.load(qsl_ptr + req + 1) - q_start
        tile_idx = pid - (q_start // BLOCK_Q + req)
        if tile_idx * BLOCK_Q >= q_len:
            return  # padding program, or past this request's queries
        seq_len = tl.load(seq_lens_ptr + req)
        context = seq_len - q_len

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_PAD)
        d_mask = offs_d < HEAD_SIZE
        q_local = tile_idx * BLOCK_Q + offs_m // GROUP  # query index inside the request
        head = kv_head * GROUP + offs_m % GROUP
        row_valid = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
        q_pos = context + q_local
        tok = (q_start + q_local).to(tl.int64)
        q = tl.load(
            q_ptr + tok[:, None] * stride_qt + head[:, None].to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd,
            mask=row_valid[:, None] & d_mask[None, :],
            other=0.0,
        )
        if KV_FP8:
            k_scale = tl.load(k_scale_ptr)
            v_scale = tl.load(v_scale_ptr)
        else:
            k_scale = 1.0
            v_scale = 1.0

        first_q = context + tile_idx * BLOCK_Q
        last_q = context + tl.minimum((tile_idx + 1) * BLOCK_Q, q_len) - 1
        bt_row_ptr = bt_ptr + req.to(tl.int64) * stride_bt_0
        qk_scale = scale * 1.4426950408889634  # log2(e): exp2 in the loop

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        # Sink part: [0, min(sink, last_q + 1)). Window part:
        # [max(sink, first_q - window + 1), last_q]; every key in it is
        # needed by some query of the tile, so its blocks are live.
        s_hi = tl.minimum(sink_tokens, last_q + 1)
        w_lo = tl.maximum(sink_tokens, first_q - window_tokens + 1)
        w_hi = last_q + 1
        if NUM_SEG > 1:
            # Split-KV: this program takes keys [seg * seg_keys, (seg + 1) *
            # seg_keys) of the sink part followed by the window part.
            s_len = s_hi
            w_len = tl.maximum(w_hi - w_lo, 0)
            v0 = seg * seg_keys
            v1 = v0 + seg_keys
            s_hi_seg = tl.minimum(v1, s_len)
            s_lo_seg = tl.minimum(v0, s_len)
            w_lo_seg = w_lo + tl.minimum(tl.maximum(v0 - s_len, 0), w_len)
            w_hi_seg = w_lo + tl.minimum(tl.maximum(v1 - s_len, 0), w_len)
        else:
            s_lo_seg = s_hi * 0
            s_hi_seg = s_hi
            w_lo_seg = w_lo
            w_hi_seg = w_hi
        # The sink part's window test is passed as always true (window =
        # last_q + 1 > q_pos - k for every k >= 0).
        m_i, l_i, acc = _attend_range(
            m_i, l_i, acc, q, q_pos, row_valid,
            s_lo_seg, s_hi_seg, last_q + 1,
            kv_ptr, bt_row_ptr, stride_bt_1, block_size, kv_head,
            stride_c0, stride_c1, stride_c2, stride_c3,
            k_scale, v_scale, qk_scale,
            HEAD_SIZE, HEAD_PAD, TILE, KV_FP8, IEEE, UPCAST,
        )
        m_i, l_i, acc = _attend_range(
            m_i, l_i, acc, q, q_pos, row_valid,
            w_lo_seg, w_hi_seg, window_tokens,
            kv_ptr, bt_row_ptr, stride_bt_1, block_size, kv_head,
            stride_c0, stride_c1, stride_c2, stride_c3,
            k_scale, v_scale, qk_scale,
            HEAD_SIZE, HEAD_PAD, TILE, KV_FP8, IEEE, UPCAST,
        )
        if NUM_SEG > 1:
            # Partial softmax state of this segment (m = -inf, l = 0, acc = 0
            # where it holds no key of the row); _combine_segments merges.
            part = (tok * NUM_HEADS + head) * NUM_SEG + seg
            tl.store(part_m_ptr + part, m_i, mask=row_valid)
            tl.store(part_l_ptr + part, l_i, mask=row_valid)
            tl.store(
                part_acc_ptr + part[:, None] * HEAD_SIZE + offs_d[None, :],
                acc,
                mask=row_valid[:, None] & d_mask[None, :],
            )
        else:
            l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padded rows only
            out = acc / l_i[:, None]
            tl.store(
                out_ptr + tok[:, None] * stride_ot + head[:, None].to(tl.int64) * stride_oh
                + offs_d[None, :] * stride_od,
                out.to(out_ptr.dtype.element_ty),
                mask=row_valid[:, None] & d_mask[None, :],
            )

    @triton.jit
    def _combine_segments(
        out_ptr,
        qsl_ptr,
        part_m_ptr,
        part_l_ptr,
        part_acc_ptr,
        num_reqs,
        stride_ot,
        stride_oh,
        stride_od,
        HEAD_SIZE: tl.constexpr,
        HEAD_PAD: tl.constexpr,
        NUM_SEG: tl.constexpr,
        SEG_PAD: tl.constexpr,
        NUM_HEADS: tl.constexpr,
    ):
        """One (token, query head): merge the segments' partial softmax states."""
        tok = tl.program_id(0)
        head = tl.program_id(1)
        if tok >= tl.load(qsl_ptr + num_reqs):
            return  # padding token: its row of the output is left as it is
        offs_s = tl.arange(0, SEG_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        s_mask = offs_s < NUM_SEG
        base = (tok.to(tl.int64) * NUM_HEADS + head) * NUM_SEG
        m = tl.load(part_m_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
        l_s = tl.load(part_l_ptr + base + offs_s, mask=s_mask, other=0.0)
        acc = tl.load(
            part_acc_ptr + (base + offs_s)[:, None] * HEAD_SIZE + offs_d[None, :],
            mask=s_mask[:, None] & (offs_d < HEAD_SIZE)[None, :],
            other=0.0,
        )
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.math.exp2(m - m_max)  # 0 for segments without keys
        total = tl.sum(w * l_s, 0)
        total = tl.where(total == 0.0, 1.0, total)
        out = tl.sum(w[:, None] * acc, 0) / total
        tl.store(
            out_ptr + tok.to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh + offs_d * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=offs_d < HEAD_SIZE,
        )


def _as_scale(scale: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    if scale is None:
        return torch.ones(1, dtype=torch.float32, device=device)
    if isinstance(scale, torch.Tensor):
        return scale.reshape(-1)[:1].float() if scale.dtype != torch.float32 else scale.reshape(-1)
    # A Python float costs a host-to-device copy: fine eagerly, not in a
    # captured graph (pass a tensor there, as vLLM's layer._k_scale is).
    return torch.tensor([float(scale)], dtype=torch.float32, device=device)


def launch_shape(max_query_len: int, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """``(BLOCK_Q, BLOCK_M)``: query tokens and rows per program."""
    group = num_heads // num_kv_heads
    base = DECODE_BLOCK_M if max_query_len <= 1 else PREFILL_BLOCK_M
    block_m = max(base, _next_pow2(group))
    return max(1, block_m // group), block_m


def split_segments(
    sink_tokens: int, window_tokens: int, block_q: int, base_programs: int, max_query_len: int,
    min_tiles: int = SEGMENT_MIN_TILES,
) -> tuple[int, int]:
    """``(num_segments, keys_per_segment)`` of a launch; ``(1, 0)``: no split.

    Decode launches only (``max_query_len <= 1``: prefill tiles already give
    enough programs, and their partial results would be large), and only a
    bounded window. Host integers alone decide, so a captured graph keeps
    its split. ``block_q`` queries of a tile need at most ``sink + window +
    block_q - 1`` keys: the segments cover that.
    """
    if max_query_len > 1 or window_tokens >= FULL_WINDOW:
        return 1, 0
    tiles = -(-(sink_tokens + window_tokens + block_q - 1) // TILE_N)
    wanted = -(-SPLIT_TARGET_PROGRAMS // max(1, base_programs))
    num_seg = min(wanted, MAX_SEGMENTS, tiles // min_tiles)
    if num_seg <= 1:
        return 1, 0
    seg_tiles = -(-tiles // num_seg)
    return -(-tiles // seg_tiles), seg_tiles * TILE_N


def sink_window_attention_triton(
    query: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2 * D]
    query_start_loc: torch.Tensor,  # [R + 1] int32
    seq_lens: torch.Tensor,  # [R] int32
    block_table: torch.Tensor,  # [R, max_blocks] int32
    block_size: int,
    sink_tokens: int,
    window_tokens: int,
    scale: float,
    output: torch.Tensor,  # [>= T, H, D], written in place
    max_query_len: int,
    num_reqs: int,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
    split_kv: bool | None = None,
) -> torch.Tensor:
    """LightTransfer lazy-layer attention for one step's batch; see the module docstring.

    ``num_reqs`` and ``query.shape[0]`` fix the grid (host ints, pad them
    for CUDA graphs); ``max_query_len`` only picks decode (1) or prefill
    tiling. Rows of ``output`` past ``query_start_loc[num_reqs]`` are left
    as they are. ``split_kv``: None lets ``split_segments`` decide; False
    never splits; True splits whenever the window is bounded and spans
    two tiles, one tile per segment, prefill tiles too (tests, benchmarks).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use paged.sink_window_attention")
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = kv_cache.shape[1]
    if kv_cache.shape[2] != block_size or kv_cache.shape[3] != 2 * head_size:
        raise ValueError(
            f"kv_cache {tuple(kv_cache.shape)} does not match block_size {block_size} "
            f"and head_size {head_size} (expected [blocks, Hkv, {block_size}, {2 * head_size}])"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if num_reqs == 0 or num_tokens == 0:
        return output
    kv_fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if kv_fp8:
        k_scale_t = _as_scale(k_scale, query.device)
        v_scale_t = _as_scale(v_scale, query.device)
    else:
        k_scale_t = v_scale_t = seq_lens  # unused pointer (KV_FP8 is off)
    group = num_heads // num_kv_heads
    block_q, block_m = launch_shape(max_query_len, num_heads, num_kv_heads)
    tiles = num_tokens // block_q + num_reqs
    num_seg, seg_keys = 1, 0
    if split_kv is None:
        num_seg, seg_keys = split_segments(sink_tokens, window_tokens, block_q, tiles * num_kv_heads, max_query_len)
    elif split_kv:
        num_seg, seg_keys = split_segments(sink_tokens, window_tokens, block_q, 1, 1, min_tiles=1)
    if num_seg > 1:
        # Partial softmax states; allocated per call (inside a captured
        # graph this comes from the graph's private pool).
        part_m = torch.empty(num_tokens, num_heads, num_seg, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(num_tokens, num_heads, num_seg, head_size, dtype=torch.float32, device=query.device)
    else:
        part_m = part_l = part_acc = seq_lens  # unused pointers (NUM_SEG == 1)
    head_pad = max(16, _next_pow2(head_size))
    grid = (tiles, num_kv_heads, num_seg)
    LAST_LAUNCH.update(grid=grid, segments=num_seg, keys_per_segment=seg_keys)
    _sink_window_kernel[grid](
        output,
        query,
        kv_cache,
        query_start_loc,
        seq_lens,
        block_table,
        k_scale_t,
        v_scale_t,
        float(scale),
        int(sink_tokens),
        int(window_tokens),
        int(num_reqs),
        int(block_size),
        *query.stride(),
        *output.stride(),
        *kv_cache.stride(),
        *block_table.stride(),
        part_m,
        part_l,
        part_acc,
        int(seg_keys),
        GROUP=group,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE=TILE_N,
        KV_FP8=kv_fp8,
        IEEE=query.dtype == torch.float32,
        # CPU tensors run only under Triton's interpreter, whose tl.dot
        # mishandles 16-bit operands (garbage for bf16 in Triton 3.9): there
        # both operands are rounded to the GPU path's dtype, then multiplied
        # in float32.
        UPCAST=query.device.type == "cpu",
        NUM_SEG=num_seg,
        NUM_HEADS=num_heads,
        num_warps=4,
    )
    if num_seg > 1:
        _combine_segments[(num_tokens, num_heads)](
            output,
            query_start_loc,
            part_m,
            part_l,
            part_acc,
            int(num_reqs),
            *output.stride(),
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad,
            NUM_SEG=num_seg,
            SEG_PAD=max(2, _next_pow2(num_seg)),
            NUM_HEADS=num_heads,
            num_warps=1,
        )
    return output


def paged_causal_attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    scale: float,
    output: torch.Tensor,
    max_query_len: int,
    num_reqs: int,
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Plain paged causal attention: the same kernel, no sinks, unbounded window."""
    return sink_window_attention_triton(
        query, kv_cache, query_start_loc, seq_lens, block_table, block_size,
        0, FULL_WINDOW, scale, output, max_query_len, num_reqs, k_scale, v_scale,
    )


def write_kv_quantized(
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2 * D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    slot_mapping: torch.Tensor,  # [>= T] long, -1 for padding
    k_scale: torch.Tensor | float | None = None,
    v_scale: torch.Tensor | float | None = None,
) -> None:
    """Write this step's keys and values; quantize into a ``float8_e4m3fn`` cache.

    fp8: stores ``clamp(key / k_scale, +-448)`` (and the same for values),
    the saturating conversion vLLM's ``reshape_and_cache_flash`` does; the
    kernel reads back ``stored * k_scale``. Other cache dtypes: a plain cast.
    Plain PyTorch on device tensors (no host sync), so it runs on CPU, on
    CUDA and inside a captured graph (with tensor scales). Padding tokens
    (slot -1) write into slot 0 of the null block, as ``paged.write_kv``.
    """
    if kv_cache.dtype != torch.float8_e4m3fn:
        write_kv(kv_cache, key, value, slot_mapping)
        return
    ks = _as_scale(k_scale, key.device)
    vs = _as_scale(v_scale, key.device)
    k = (key.float() / ks).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    v = (value.float() / vs).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    # Scatter as bytes: indexing kernels do not all exist for float8.
    write_kv(kv_cache.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8), slot_mapping)

