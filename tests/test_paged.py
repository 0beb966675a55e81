"""The paged sink+window kernel against the dense reference, on random inputs."""

from __future__ import annotations

import random

import pytest
import torch

import os

from vllm_lighttransfer.attention import cpu_kernel
from vllm_lighttransfer.attention.paged import plan_sink_window, sink_window_attention, write_kv
from vllm_lighttransfer.reference import reference_attention, sink_window_mask

# Every kernel path against the reference: the plain-PyTorch path (the
# fallback) and the C++ CPU op (what the backend runs on CPU).
PATHS = ["torch", "cpu"]


def attend(path, query, cache, qsl, seq_lens, table, block_size, sink, window, scale, out, tile=64):
    """One step's lazy-layer attention through ``path``; writes ``out``."""
    qsl = torch.as_tensor(qsl, dtype=torch.int32)
    seq_lens = torch.as_tensor(seq_lens, dtype=torch.int32)
    if path == "cpu":
        if not cpu_kernel.available():
            if os.environ.get(cpu_kernel.ENV_SWITCH) == "0":
                pytest.skip(f"{cpu_kernel.ENV_SWITCH}=0")
            pytest.fail(f"the C++ CPU kernel did not build: {cpu_kernel._load()}")
        return cpu_kernel.cpu_sink_window_attention(
            query, cache, qsl, seq_lens, table, sink, window, scale, out, tile=tile)
    q_lens = (qsl[1:] - qsl[:-1]).tolist()
    plan = plan_sink_window(qsl, seq_lens, table, block_size, sink, window, max(q_lens),
                            int(seq_lens.max()), cache.shape[1], query.shape[1] // cache.shape[1], tile=tile)
    return sink_window_attention(query, cache, plan, scale, out)


def test_mask_rule_by_hand():
    # sink 2, window 3, query at position 6: keys 0, 1 (sinks) and 4, 5, 6.
    mask = sink_window_mask(torch.tensor([6]), torch.arange(8), 2, 3)
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 4, 5, 6]
    # Before sink + window tokens the rule is plain causal.
    mask = sink_window_mask(torch.arange(5), torch.arange(5), 2, 3)
    assert torch.equal(mask, torch.ones(5, 5, dtype=torch.bool).tril())


def _paged_batch(rng, seq_lens, num_kv_heads, head_size, block_size, dtype):
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 8
    cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size).to(dtype)
    perm = (torch.randperm(num_blocks - 1) + 1).tolist()  # block 0 plays the null block
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    keys, values = [], []
    for r, s in enumerate(seq_lens):
        n = -(-s // block_size)
        table[r, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
        k = torch.randn(s, num_kv_heads, head_size).to(dtype)
        v = torch.randn(s, num_kv_heads, head_size).to(dtype)
        slots = table[r, torch.arange(s) // block_size].long() * block_size + torch.arange(s) % block_size
        write_kv(cache, k, v, slots)
        keys.append(k)
        values.append(v)
    return cache, table, keys, values


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("seed", range(12))
def test_paged_equals_reference(seed, path):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    heads, kv_heads, head_size = rng.choice([(4, 2, 16), (6, 3, 8), (2, 2, 32), (9, 3, 64), (8, 2, 128)])
    block_size = rng.choice([4, 16, 32])
    sink = rng.choice([0, 1, 3, 5, 17])
    window = rng.choice([1, 2, 7, 32, 45, 1000])
    seq_lens = [rng.randint(1, 150) for _ in range(rng.randint(1, 5))]
    # Mixed batch: decodes (1 query), chunks and whole prompts.
    q_lens = [rng.choice([1, s, rng.randint(1, s)]) for s in seq_lens]
    cache, table, keys, values = _paged_batch(rng, seq_lens, kv_heads, head_size, block_size, torch.float32)
    cache[0] = float("nan")  # the null block: never read

    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    query = torch.randn(int(qsl[-1]), heads, head_size)
    out = torch.full((int(qsl[-1]) + 2, heads, head_size), 7.0)  # padded rows stay untouched
    attend(path, query, cache, qsl, seq_lens, table, block_size, sink, window, 0.3, out,
           tile=rng.choice([1, 8, 64]))
    for r, (s, q) in enumerate(zip(seq_lens, q_lens)):
        ref = reference_attention(
            query[qsl[r] : qsl[r + 1]], keys[r], values[r],
            torch.arange(s - q, s), torch.arange(s), 0.3, sink, window,
        )
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]], ref, atol=2e-5, rtol=1e-5)
    assert (out[int(qsl[-1]):] == 7.0).all()


@pytest.mark.parametrize("path", PATHS)
def test_freed_blocks_are_never_read(path):
    """Blocks between the sinks and the window may hold NaN (recycled): no effect."""
    torch.manual_seed(0)
    block_size, sink, window, seq = 8, 3, 10, 64
    cache, table, keys, values = _paged_batch(random.Random(0), [seq], 2, 16, block_size, torch.float32)
    # Free blocks 1..5 (positions 8..47): the query at 63 needs 0..2 and 54..63.
    for b in range(1, 6):
        cache[table[0, b]] = float("nan")
        table[0, b] = 0
    cache[0] = float("nan")  # the null block
    query = torch.randn(1, 4, 16)
    out = torch.zeros_like(query)
    attend(path, query, cache, [0, 1], [seq], table, block_size, sink, window, 0.25, out)
    ref = reference_attention(query, keys[0], values[0], torch.tensor([seq - 1]), torch.arange(seq), 0.25, sink, window)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("head_size", [32, 64])
def test_bfloat16_within_tolerance(path, head_size):
    torch.manual_seed(1)
    cache, table, keys, values = _paged_batch(random.Random(1), [90, 40], 2, head_size, 16, torch.bfloat16)
    query = torch.randn(91, 4, head_size).to(torch.bfloat16)
    out = torch.zeros_like(query)
    attend(path, query, cache, [0, 90, 91], [90, 40], table, 16, 4, 20, 0.2, out)
    ref = reference_attention(query[:90].float(), keys[0].float(), values[0].float(), torch.arange(90), torch.arange(90), 0.2, 4, 20)
    torch.testing.assert_close(out[:90].float(), ref, atol=2e-2, rtol=2e-2)
    ref = reference_attention(query[90:].float(), keys[1].float(), values[1].float(), torch.tensor([39]), torch.arange(40), 0.2, 4, 20)
    torch.testing.assert_close(out[90:].float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(6))
def test_16bit_mixed_batches(seed, dtype, path):
    """Model-like shapes in 16 bits (the CPU op's bf16 pair products where the
    CPU has them; decode items that read every KV head of a block, GQA groups
    of 3, 6 and 7 query heads per KV head, so row blocks of 4 leave 3, 2 or 1)."""
    rng = random.Random(100 + seed)
    torch.manual_seed(100 + seed)
    heads, kv_heads, head_size = rng.choice([(9, 3, 64), (8, 2, 128), (4, 4, 32), (14, 2, 64), (12, 2, 128)])
    block_size, sink, window = 32, rng.choice([0, 4, 37]), rng.choice([50, 100, 1000])
    seq_lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 4))]
    q_lens = [rng.choice([1, s, rng.randint(1, s)]) for s in seq_lens]
    cache, table, keys, values = _paged_batch(rng, seq_lens, kv_heads, head_size, block_size, dtype)
    cache[0] = float("nan")
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    query = torch.randn(int(qsl[-1]), heads, head_size).to(dtype)
    out = torch.zeros_like(query)
    attend(path, query, cache, qsl, seq_lens, table, block_size, sink, window, head_size**-0.5, out,
           tile=rng.choice([1, 64, 128]))
    for r, (s, q) in enumerate(zip(seq_lens, q_lens)):
        ref = reference_attention(query[qsl[r] : qsl[r + 1]].float(), keys[r].float(), values[r].float(),
                                  torch.arange(s - q, s), torch.arange(s), head_size**-0.5, sink, window)
        torch.testing.assert_close(out[qsl[r] : qsl[r + 1]].float(), ref, atol=2e-2, rtol=2e-2)


def test_cpu_kernel_reads_strided_views():
    """vLLM hands the layer a query sliced out of the fused QKV projection and a
    cache that may be a strided view: the op must follow the strides."""
    torch.manual_seed(2)
    heads, kv_heads, d, bs = 6, 2, 32, 16
    seq_lens, q_lens = [70, 33], [70, 1]
    cache, table, keys, values = _paged_batch(random.Random(2), seq_lens, kv_heads, d, bs, torch.float32)
    # The same cache with another memory order: [blocks, bs, Hkv, 2D] permuted back.
    strided = cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert not strided.is_contiguous()
    qkv = torch.randn(71, (heads + 2 * kv_heads) * d)
    query = qkv[:, : heads * d].view(71, heads, d)  # row stride (H + 2 Hkv) * D
    expected = torch.zeros(71, heads, d)
    attend("torch", query.contiguous(), cache, [0, 70, 71], seq_lens, table, bs, 3, 25, 0.2, expected)
    out = torch.zeros(71, heads, d)
    attend("cpu", query, strided, [0, 70, 71], seq_lens, table, bs, 3, 25, 0.2, out)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
