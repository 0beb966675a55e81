"""Sink + window attention over a paged KV cache, in plain PyTorch.

What it does
    ``plan_sink_window`` turns one step's batch (query start offsets, sequence
    lengths, the lazy group's block table) into query tiles: every tile holds up
    to ``tile`` consecutive query tokens of one request and the key positions
    they may need, which are the ``sink`` first positions plus the positions
    from ``first_query - window + 1`` to ``last_query``. The plan (indices and
    the boolean mask) is built once per step and shared by every lazy layer.
    ``sink_window_attention`` gathers those keys and values through the block
    table and runs masked softmax attention on all tiles at once: no Python
    loop over requests, and the same code runs on CPU and CUDA tensors.

Semantics
    Query at position ``t`` attends to key ``k`` iff
    ``k <= t and (k < sink or k > t - window)`` (see ``reference.py``).
    Keys at positions below ``sink`` come only from the sink part of a tile,
    so no key is counted twice when the window reaches back into the sinks.

Cost
    A tile of ``Q`` queries reads ``sink + window + Q - 1`` keys, whatever the
    context length: prefill of ``L`` tokens costs ``O(L * (sink + window))``,
    not ``O(L^2)``; decode reads ``sink + window`` keys per request.

KV cache layout
    vLLM hands each layer a 4-D view ``[num_blocks, num_kv_heads, block_size,
    2 * head_size]`` (possibly strided, whatever the resolved layout). This
    backend stores the key in ``[..., :head_size]`` and the value in
    ``[..., head_size:]`` of each token row and only ever indexes the view, so
    any layout vLLM resolves works.

Limitations
    A tile gathers ``Q - 1`` keys more than a single query needs, and the
    mask is dense over the gathered keys (``torch``'s fused attention with a
    boolean mask; no block skipping inside a tile).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Queries per tile in prefill. Larger tiles re-read fewer keys per query
# (sink + window + Q - 1 keys for Q queries) but pad more in mixed batches.
DEFAULT_TILE = 64


@dataclass
class SinkWindowPlan:
    num_tiles: int
    q_index: torch.Tensor  # [nt, Q] long: row of the query tensor (0 where padded)
    q_valid: torch.Tensor  # [nt, Q] bool
    k_block: torch.Tensor  # [nt, K] long: physical block id of each key
    k_offset: torch.Tensor  # [nt, K] long: slot inside the block
    allowed: torch.Tensor  # [nt, 1, G * Q, K] bool: allowed (query row, key) pairs
    kv_heads: torch.Tensor  # [Hkv] long: arange, to gather [nt, Hkv, K] at once
    kv_rows: torch.Tensor  # [nt * Hkv * K] long: rows of a contiguous cache viewed [-1, 2D]
    dense: bool  # no padded query rows: tile rows are exactly query rows 0 .. T-1


def plan_sink_window(
    query_start_loc: torch.Tensor,  # [R + 1]
    seq_lens: torch.Tensor,  # [R]
    block_table: torch.Tensor,  # [R, max_blocks]
    block_size: int,
    sink_tokens: int,
    window_tokens: int,
    max_query_len: int,
    max_seq_len: int,
    num_kv_heads: int,
    num_queries_per_kv: int,
    tile: int = DEFAULT_TILE,
) -> SinkWindowPlan:
    device = seq_lens.device
    num_reqs = seq_lens.shape[0]
    qsl = query_start_loc[: num_reqs + 1].long()
    seq = seq_lens.long()
    q_lens = qsl[1:] - qsl[:-1]  # [R]
    Q = max(1, min(tile, max_query_len))
    tiles = (q_lens + Q - 1) // Q  # [R]
    num_tiles = int(tiles.sum().item())

    tile_req = torch.repeat_interleave(torch.arange(num_reqs, device=device), tiles)
    first_tile = torch.cumsum(tiles, 0) - tiles
    tile_in_req = torch.arange(num_tiles, device=device) - first_tile[tile_req]
    req_start = qsl[tile_req]  # [nt]
    tok = req_start[:, None] + tile_in_req[:, None] * Q + torch.arange(Q, device=device)
    q_valid = tok < qsl[tile_req + 1][:, None]  # [nt, Q]
    # Position of query row j of request r: seq_len - q_len + (j - start).
    ctx = (seq - q_lens)[tile_req]
    q_pos = ctx[:, None] + (tok - req_start[:, None])  # [nt, Q]
    tok = torch.where(q_valid, tok, torch.zeros_like(tok))

    # Key positions: the sink part, then a window span covering the tile.
    S = min(sink_tokens, max_seq_len)
    W = min(window_tokens, max_seq_len)
    sink_pos = torch.arange(S, device=device).expand(num_tiles, S)
    first_q = q_pos[:, 0]
    win_pos = (first_q - W + 1)[:, None] + torch.arange(W + Q - 1, device=device)
    k_pos = torch.cat([sink_pos, win_pos], dim=1)  # [nt, K]

    qp = q_pos[:, :, None]
    kp = k_pos[:, None, :]
    in_sink_part = (torch.arange(k_pos.shape[1], device=device) < S)[None, None, :]
    allowed_sink = (kp < sink_tokens) & (kp <= qp)
    allowed_win = (kp >= sink_tokens) & (kp >= 0) & (kp <= qp) & (kp > qp - window_tokens)
    mask = torch.where(in_sink_part, allowed_sink, allowed_win) & q_valid[:, :, None]
    k_used = mask.any(dim=1)  # [nt, K]
    # Padded query rows attend to key 0 only, so softmax never sees an empty
    # row; their output is discarded.
    mask[:, :, 0] |= ~q_valid
    # Keys no query of the tile uses may sit in freed or null blocks holding
    # anything (NaN included, and 0 * NaN is NaN). Point them at the slot of
    # the tile's first query instead: written this step, always finite.
    k_pos = torch.where(k_used, k_pos, first_q[:, None])

    max_pos = block_table.shape[1] * block_size - 1
    kp_c = k_pos.clamp(0, max_pos)
    k_block = block_table.long()[tile_req[:, None], kp_c // block_size]
    k_offset = kp_c % block_size
    kv_heads = torch.arange(num_kv_heads, device=device)
    return SinkWindowPlan(
        num_tiles=num_tiles,
        q_index=tok,
        q_valid=q_valid,
        k_block=k_block,
        k_offset=k_offset,
        # Rows ordered (query head in group, query): see sink_window_attention.
        allowed=mask[:, None, None]
        .expand(num_tiles, 1, num_queries_per_kv, Q, mask.shape[-1])
        .reshape(num_tiles, 1, num_queries_per_kv * Q, mask.shape[-1]),
        kv_heads=kv_heads,
        kv_rows=((k_block[:, None, :] * num_kv_heads + kv_heads[None, :, None]) * block_size
                 + k_offset[:, None, :]).flatten(),
        # Tiles are consecutive runs of each request's rows, requests in
        # order: without padding they cover rows 0 .. T-1 in order.
        dense=num_tiles * Q == int(qsl[-1].item()),
    )


def write_kv(
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2 * D]
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    slot_mapping: torch.Tensor,  # [>= T] long, -1 for padding
) -> None:
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    num_tokens = key.shape[0]
    # Padding tokens (slot -1) write into slot 0 of block 0, vLLM's null
    # block: never read as data, and no sync to filter them out.
    slots = slot_mapping[:num_tokens].long().clamp_(min=0)
    blocks = slots // block_size
    offsets = slots % block_size
    kv = torch.cat([key, value], dim=-1).to(kv_cache.dtype)  # [T, Hkv, 2D]
    if kv_cache.is_contiguous():
        heads = torch.arange(num_kv_heads, device=slots.device)
        rows = ((blocks[:, None] * num_kv_heads + heads[None, :]) * block_size + offsets[:, None]).flatten()
        kv_cache.view(-1, width).index_copy_(0, rows, kv.reshape(-1, width))
    else:
        kv_cache[blocks, :, offsets] = kv


def sink_window_attention(
    query: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2 * D]
    plan: SinkWindowPlan,
    scale: float,
    output: torch.Tensor,  # [>= T, H, D], written in place
) -> torch.Tensor:
    nt, Q = plan.q_index.shape
    if nt == 0:
        return output
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[1]
    group = num_heads // num_kv_heads

    # One gather straight into [nt, Hkv, K, 2D]: contiguous per head. A
    # contiguous cache (vLLM's default CPU layout) is gathered as rows, the
    # fastest copy; any other layout through the strided view.
    K = plan.k_block.shape[1]
    if kv_cache.is_contiguous():
        kv = kv_cache.view(-1, kv_cache.shape[-1]).index_select(0, plan.kv_rows)
        kv = kv.view(nt, num_kv_heads, K, kv_cache.shape[-1])
    else:
        kv = kv_cache[plan.k_block[:, None, :], plan.kv_heads[None, :, None], plan.k_offset[:, None, :]]
    k = kv[..., :head_size]  # [nt, Hkv, K, D]
    v = kv[..., head_size:]
    # Fold the query heads sharing a KV head into the rows of one attention.
    T = nt * Q
    q = query[:T].view(nt, Q, num_heads, head_size) if plan.dense else query[plan.q_index]
    q = q.view(nt, Q, num_kv_heads, group, head_size).permute(0, 2, 3, 1, 4)
    q = q.reshape(nt, num_kv_heads, group * Q, head_size).to(kv.dtype)
    # PyTorch's fused attention (flash kernel on CPU): scale, mask, softmax
    # and both products in one pass, float32 accumulation.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.allowed, scale=scale)
    out = out.view(nt, num_kv_heads, group, Q, head_size).permute(0, 3, 1, 2, 4)
    out = out.reshape(nt, Q, num_heads, head_size)
    if plan.dense:
        output[:T] = out.reshape(T, num_heads, head_size)
    else:
        output[plan.q_index[plan.q_valid]] = out[plan.q_valid].to(output.dtype)
    return output
