"""KV cache spec and manager for sink + window (lazy) layers.

What it does
    ``SinkWindowSpec`` is vLLM's ``SlidingWindowSpec`` plus ``sink_tokens``. It
    subclasses the sliding-window spec on purpose: every place vLLM handles
    "a layer that only needs recent tokens" (grouping, admission caps, the
    hybrid coordinator, the fallback that promotes windows to full attention
    when the hybrid manager is disabled) then handles lazy layers too, while
    the registry maps it to our own manager and its own KV cache group.

    ``SinkWindowManager`` keeps the first ``ceil(sink / block_size)`` blocks of
    every request and frees each block that falls between the sinks and the
    window into vLLM's null block, so a lazy layer holds at most
    ``ceil(sink/bs) + ceil(window/bs) + 1`` real blocks per request in decode,
    whatever the context length.

Worked example (block_size 4, sink 2, window 6)
    After 17 computed tokens the next token (position 17) attends to keys
    {0, 1} and {12..17}. Blocks: [0-3] [4-7] [8-11] [12-15] [16-19]. Block 0
    holds the sinks and stays; blocks 1 and 2 hold nothing visible and are
    freed; blocks 3 and 4 hold the window. Real blocks: 3 <= 1 + 2 + 1.

Prefix caching
    A cache hit of ``n`` tokens is valid only if the sink blocks and the last
    ``window - 1`` tokens before ``n`` are cached. ``find_longest_cache_hit``
    takes vLLM's sliding-window hit and then requires the sink blocks; when a
    sink block is missing it falls back to the longest run of cached blocks
    from the start (a plain prefix, always valid). Every full block is offered
    to the prefix cache (no sparse retention) so sink blocks can be found.

References
    vllm/v1/core/single_type_kv_cache_manager.py (SlidingWindowManager,
    RSWAManager), vllm/v1/kv_cache_interface.py (SlidingWindowSpec).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_utils import resolve_block_hashes
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import KVCacheSpec, SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class SinkWindowSpec(SlidingWindowSpec):
    """KV spec of a lazy layer: ``sink_tokens`` initial + ``sliding_window`` recent."""

    sink_tokens: int = 0

    @property
    def window_tokens(self) -> int:
        return self.sliding_window

    @property
    def num_sink_blocks(self) -> int:
        return cdiv(self.sink_tokens, self.block_size)

    def max_admission_blocks_per_request(
        self, max_in_flight_tokens: int, max_model_len: int
    ) -> int:
        # The sink blocks come on top of vLLM's sliding-window bound, which
        # covers the window plus the tokens in flight (a whole prefill chunk):
        # before a chunk is computed its blocks must all be allocated, and the
        # blocks below the window are only freed once the chunk is processed.
        # E.g. block 32, sink 4, window 1020, 2048 tokens in flight:
        # 1 sink block + cdiv(1019 + 2048, 32) + 1 = 1 + 96 + 1 = 98 blocks,
        # never more than the full-attention cdiv(max_model_len, 32).
        window_blocks = super().max_admission_blocks_per_request(
            max_in_flight_tokens, max_model_len
        )
        return min(self.num_sink_blocks + window_blocks, cdiv(max_model_len, self.block_size) + 1)

    def steady_state_blocks_per_request(self, max_model_len: int | None = None) -> int:
        """Real blocks a decoding request holds: sinks + window + 1 partial block.

        E.g. block 32, sink 4, window 1020: 1 + 32 + 1 = 34 blocks (1088 token
        slots) against 256 blocks for a full layer at 8192 tokens.
        """
        blocks = self.num_sink_blocks + cdiv(self.sliding_window, self.block_size) + 1
        if max_model_len is not None:
            blocks = min(blocks, cdiv(max_model_len, self.block_size))
        return blocks

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # vLLM's capacity figures ("KV cache size", "Maximum concurrency")
        # divide the pool by this per-request amount. A lazy layer's request
        # holds its steady-state blocks; the extra blocks of a prefill chunk in
        # flight are bounded by max_num_batched_tokens for the whole batch, not
        # per request, so charging them to every request (as vLLM does for
        # plain sliding windows) would understate capacity by up to 40% at
        # vLLM's default chunk size. Admission stays conservative:
        # max_admission_blocks_per_request still reserves a whole chunk.
        return (
            self.steady_state_blocks_per_request(vllm_config.model_config.max_model_len)
            * self.page_size_bytes
        )

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(
            isinstance(spec, SinkWindowSpec)
            and spec.sliding_window == self.sliding_window
            and spec.sink_tokens == self.sink_tokens
            for spec in kv_cache_specs.values()
        )


class SinkWindowManager(SlidingWindowManager):
    """Frees the blocks between the sink blocks and the sliding window."""

    def __init__(self, kv_cache_spec: SinkWindowSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_tokens = kv_cache_spec.sink_tokens
        self.num_sink_blocks = cdiv(self.sink_tokens, self.block_size)

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        del num_prompt_tokens
        num_skipped_tokens = self.get_num_skipped_tokens(processed_computed_tokens)
        if num_skipped_tokens <= 0 or request_id not in self.req_to_blocks:
            return
        blocks = self.req_to_blocks[request_id]
        # A block is freed only when all of it lies below the window, and the
        # sink blocks are never freed.
        last = min(num_skipped_tokens // self.block_size, len(blocks))
        self._remove_blocks_in_range(request_id, self.num_sink_blocks, last)

    def _skipped_blocks(self, num_computed_tokens: int) -> int:
        return self.get_num_skipped_tokens(num_computed_tokens) // self.block_size

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks: Sequence,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        num = super().get_num_blocks_to_allocate(
            request_id,
            num_tokens,
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            num_tokens_main_model,
            apply_admission_cap=apply_admission_cap,
            prefill_end=prefill_end,
        )
        if request_id in self.num_cached_block or not new_computed_blocks:
            return num
        # The base class treats every block below the window as skipped; the
        # sink blocks among them are kept, so evictable ones must be counted.
        num_req_blocks = len(self.req_to_blocks.get(request_id, ()))
        skipped = self._skipped_blocks(total_computed_tokens)
        kept = new_computed_blocks[num_req_blocks : min(self.num_sink_blocks, skipped)]
        return num + self._get_num_evictable_blocks(kept)

    def add_local_computed_blocks(
        self,
        request_id: str,
        new_computed_blocks: Sequence,
        num_local_computed_tokens: int,
        num_external_computed_tokens: int,
    ) -> None:
        req_blocks = self.req_to_blocks[request_id]
        assert len(req_blocks) == 0
        assert num_local_computed_tokens % self.block_size == 0, (
            "sink+window cache hits are block aligned"
        )
        total = num_local_computed_tokens + num_external_computed_tokens
        skipped = self._skipped_blocks(total)
        num_head = min(self.num_sink_blocks, skipped, len(new_computed_blocks))
        head = list(new_computed_blocks[:num_head])
        tail = list(new_computed_blocks[skipped:]) if skipped > 0 else list(new_computed_blocks[num_head:])
        if self.enable_caching:
            self.block_pool.touch(head + tail)
        else:
            assert not any(new_computed_blocks), (
                "Computed blocks should be empty when prefix caching is disabled"
            )
        req_blocks.extend(head)
        req_blocks.extend([self._null_block] * max(0, skipped - num_head))
        req_blocks.extend(tail)
        self.num_cached_block[request_id] = len(req_blocks)

    @classmethod
    def find_longest_cache_hit(
        cls,
        block_hashes,
        max_length: int,
        kv_cache_group_ids: list[int],
        block_pool,
        kv_cache_spec: KVCacheSpec,
        drop_eagle_block: bool,
        alignment_tokens: int,
        dcp_world_size: int = 1,
        pcp_world_size: int = 1,
    ):
        assert isinstance(kv_cache_spec, SinkWindowSpec)
        computed, hit_length = super().find_longest_cache_hit(
            block_hashes,
            max_length,
            kv_cache_group_ids,
            block_pool,
            kv_cache_spec,
            drop_eagle_block,
            alignment_tokens,
            dcp_world_size,
            pcp_world_size,
        )
        block_size = kv_cache_spec.block_size
        num_hit_blocks = hit_length // block_size
        num_sink = min(kv_cache_spec.num_sink_blocks, num_hit_blocks)
        if num_sink == 0:
            return computed, hit_length
        hashes = resolve_block_hashes(
            block_hashes,
            block_pool.hash_block_size,
            block_size,
            supports_fine_grained_hash_lookup=cls.supports_fine_grained_hash_lookup,
            alignment_tokens=alignment_tokens,
        )
        for i in range(num_sink):
            if not computed[0][i].is_null:
                continue
            cached = block_pool.get_cached_block(hashes[i], kv_cache_group_ids)
            if cached is None:
                # Sink block i is gone: only a plain prefix of fully cached
                # blocks [0, i) remains a valid hit.
                keep = i
                while keep > 0 and (keep * block_size) % alignment_tokens != 0:
                    keep -= 1
                for blocks in computed:
                    del blocks[keep:]
                return computed, keep * block_size
            for blocks, block in zip(computed, cached):
                blocks[i] = block
        return computed, hit_length

    @classmethod
    def reachable_block_mask(cls, *args, **kwargs):
        # Cache every full block: a hit needs the sink blocks, which the
        # sliding-window policy would consider unreachable.
        return None
