"""SinkWindowManager on a real vLLM BlockPool with a toy spec (table-driven)."""

from __future__ import annotations

import pytest
import torch

from vllm.v1.core.block_pool import BlockPool

import vllm_lighttransfer
from vllm_lighttransfer.kv_cache import SinkWindowManager, SinkWindowSpec


def make_spec(block_size, sink, window):
    return SinkWindowSpec(
        block_size=block_size,
        num_kv_heads=1,
        head_size=1,
        dtype=torch.float32,
        sliding_window=window,
        sink_tokens=sink,
    )


def make_manager(block_size, sink, window, num_blocks=100):
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=False, hash_block_size=block_size)
    manager = SinkWindowManager(
        make_spec(block_size, sink, window),
        block_pool=pool,
        enable_caching=False,
        kv_cache_group_id=0,
        scheduler_block_size=block_size,
    )
    return manager, pool


@pytest.mark.parametrize(
    "block_size, sink, window, computed, expected_real",
    [
        # Worked example of kv_cache.py: block 4, sink 2, window 6, 17 computed:
        # block 0 (sinks) stays, blocks 1-2 freed, blocks 3-4 hold the window.
        (4, 2, 6, 17, [True, False, False, True, True]),
        # No sinks: plain sliding window.
        (4, 0, 6, 17, [False, False, False, True, True]),
        # Sinks spanning two blocks (sink 5 ends inside block 1).
        (4, 5, 4, 24, [True, True, False, False, False, True, True]),
        # Window covers everything: nothing freed.
        (4, 2, 100, 17, [True] * 5),
        # Sink 0 window 1: only the block of the next token.
        (4, 0, 1, 16, [False, False, False, False, True]),
    ],
)
def test_remove_skipped_keeps_sinks_and_window(block_size, sink, window, computed, expected_real):
    manager, pool = make_manager(block_size, sink, window)
    num_tokens = computed + 1  # the next token needs its slot
    manager.allocate_new_blocks("r", num_tokens, num_tokens)
    free_before = pool.get_num_free_blocks()
    manager.remove_skipped_blocks("r", computed)
    real = [not b.is_null for b in manager.req_to_blocks["r"]]
    assert real == expected_real
    assert pool.get_num_free_blocks() == free_before + expected_real.count(False)


@pytest.mark.parametrize("block_size, sink, window", [(4, 2, 6), (32, 4, 1020), (16, 17, 33), (32, 0, 64)])
def test_decode_never_exceeds_bound_and_frees_everything(block_size, sink, window):
    manager, pool = make_manager(block_size, sink, window, num_blocks=400)
    bound = -(-sink // block_size) + -(-window // block_size) + 1
    free_start = pool.get_num_free_blocks()
    for computed in range(0, 3000, 7):
        manager.remove_skipped_blocks("r", computed)
        manager.allocate_new_blocks("r", computed + 1, computed + 1)
        real = sum(not b.is_null for b in manager.req_to_blocks["r"])
        assert real <= bound
    manager.free("r")
    assert pool.get_num_free_blocks() == free_start


def test_capacity_is_steady_state_and_admission_reserves_a_chunk():
    spec = make_spec(32, 4, 1020)
    assert spec.steady_state_blocks_per_request() == 1 + 32 + 1
    # Admission still reserves the window plus a whole chunk in flight.
    assert spec.max_admission_blocks_per_request(2048, 8192) == 1 + (-(-(1019 + 2048) // 32)) + 1
    # Never more than full attention would need.
    assert spec.max_admission_blocks_per_request(8192, 2048) <= 2048 // 32 + 1


def test_register_is_idempotent():
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    vllm_lighttransfer.register()
    vllm_lighttransfer.register()
    vllm_lighttransfer._registered = False  # force the body to run again
    vllm_lighttransfer.register()
    spec = make_spec(32, 4, 64)
    assert KVCacheSpecRegistry.get_manager_class(spec) is SinkWindowManager
    # vLLM's own specs are still registered next to ours.
    assert KVCacheSpecRegistry.get_manager_class(
        SlidingWindowSpec(block_size=32, num_kv_heads=1, head_size=1, dtype=torch.float32, sliding_window=64)
    ).__name__ == "SlidingWindowManager"
    assert KVCacheSpecRegistry.get_manager_class(
        FullAttentionSpec(block_size=32, num_kv_heads=1, head_size=1, dtype=torch.float32)
    ).__name__ == "FullAttentionManager"
