"""vLLM attention backend for lazy layers: sink + window over the group's block table.

What it does
    ``SinkWindowAttentionBackend`` is registered with vLLM under
    ``LIGHTTRANSFER_SINK_WINDOW``. Its metadata builder runs once per step for
    the lazy KV cache group and turns the group's own block table into a
    ``SinkWindowPlan`` (``paged.py``); every lazy layer's ``forward`` then reads
    only sink and window slots through that plan. Prefill, chunked prefill,
    decode and mixed batches go through the same batched code path.

    ``SinkWindowAttention`` is vLLM's ``Attention`` layer with this backend and
    a ``SinkWindowSpec`` as its KV cache spec, so vLLM puts lazy layers in their
    own KV cache group with its own block tables.

Constraints
    KV cache dtype ``auto`` (the model dtype); decoder self-attention only.
    Plain PyTorch, so it runs wherever torch runs (CPU in CI, CUDA tensors on
    a GPU); no CUDA graphs (``AttentionCGSupport.NEVER``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec, get_kv_quant_mode

from vllm_lighttransfer.attention.paged import (
    SinkWindowPlan,
    plan_sink_window,
    sink_window_attention,
    write_kv,
)
from vllm_lighttransfer.kv_cache import SinkWindowSpec

BACKEND_NAME = "LIGHTTRANSFER_SINK_WINDOW"


class SinkWindowAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any head size

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type["SinkWindowAttentionImpl"]:
        return SinkWindowAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["SinkWindowMetadataBuilder"]:
        return SinkWindowMetadataBuilder


@dataclass
class SinkWindowMetadata:
    num_actual_tokens: int
    plan: SinkWindowPlan


class SinkWindowMetadataBuilder(AttentionMetadataBuilder[SinkWindowMetadata]):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
        settings = {
            (
                layer.impl.sink_tokens,
                layer.impl.window_tokens,
                layer.impl.num_heads // layer.impl.num_kv_heads,
            )
            for layer in layers.values()
            if isinstance(layer.impl, SinkWindowAttentionImpl)
        }
        if len(settings) != 1:
            raise ValueError(
                "every lazy layer of a KV cache group must share sink_tokens, "
                f"window_tokens and heads per KV head; got {sorted(settings)}"
            )
        self.sink_tokens, self.window_tokens, self.num_queries_per_kv = settings.pop()
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SinkWindowMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        plan = plan_sink_window(
            query_start_loc=cm.query_start_loc[: num_reqs + 1],
            seq_lens=cm.seq_lens[:num_reqs],
            block_table=cm.block_table_tensor[:num_reqs],
            block_size=self.block_size,
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            num_kv_heads=self.num_kv_heads,
            num_queries_per_kv=self.num_queries_per_kv,
        )
        return SinkWindowMetadata(num_actual_tokens=cm.num_actual_tokens, plan=plan)


class SinkWindowAttentionImpl(AttentionImpl[SinkWindowMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sink_tokens: int = 0,
    ) -> None:
        if alibi_slopes is not None or logits_soft_cap:
            raise NotImplementedError(
                f"{BACKEND_NAME} supports neither ALiBi nor logits soft-capping"
            )
        if kv_sharing_target_layer_name is not None:
            raise NotImplementedError(f"{BACKEND_NAME} does not support KV sharing")
        if sliding_window is None:
            raise ValueError(f"{BACKEND_NAME} needs window_tokens (sliding_window)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sink_tokens = sink_tokens
        self.window_tokens = sliding_window
        self.sliding_window = sliding_window

    def forward(
        self,
        layer,
        query: torch.Tensor,  # [T, H, D]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2 * D]
        attn_metadata: SinkWindowMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} has no fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        n = attn_metadata.num_actual_tokens
        return sink_window_attention(query[:n], kv_cache, attn_metadata.plan, self.scale, output)

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        write_kv(kv_cache, key, value, slot_mapping)


class SinkWindowAttention(Attention):
    """vLLM ``Attention`` for a lazy layer: sink + window, own KV cache group."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None,
        *,
        sink_tokens: int,
        window_tokens: int,
        cache_config=None,
        quant_config=None,
        prefix: str = "",
    ) -> None:
        if cache_config is not None and cache_config.cache_dtype not in ("auto",):
            raise ValueError(
                f"kv_cache_dtype={cache_config.cache_dtype!r} is not supported by "
                "LightTransfer lazy layers; allowed: 'auto'"
            )
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads=num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=window_tokens,
            prefix=prefix,
            attn_type=AttentionType.DECODER,
            attn_backend=SinkWindowAttentionBackend,
            sink_tokens=sink_tokens,
        )
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec | None:
        return SinkWindowSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            head_size_v=self.head_size_v,
            dtype=self.kv_cache_torch_dtype,
            kv_quant_mode=get_kv_quant_mode(self.kv_cache_dtype),
            sliding_window=self.window_tokens,
            sink_tokens=self.sink_tokens,
        )
