"""vLLM attention backend for lazy layers: sink + window over the group's block table.

What it does
    ``SinkWindowAttentionBackend`` is registered with vLLM under
    ``LIGHTTRANSFER_SINK_WINDOW``. Its metadata builder runs once per step for
    the lazy KV cache group and hands every lazy layer the group's own block
    table, query offsets and sequence lengths; each layer then reads only sink
    and window slots. Prefill, chunked prefill, decode and mixed batches go
    through the same call. Three kernels, picked once per builder:

    * CPU: ``cpu_kernel`` (a C++ op built on first use) reads the paged cache
      in place; against vLLM's own CPU sliding-window kernel over the same
      keys 1.4x faster in prefill, 1.2-2x in decode
      (``bench/kernel_bench.py``).
    * CUDA: ``triton_sink_window`` (a Triton kernel, in place, CUDA-graph
      safe, FP8 KV cache).
    * Anything else, or where the above cannot run (no compiler, no Triton,
      ``LIGHTTRANSFER_CPU_KERNEL=0``): ``paged.py``, plain PyTorch, the path
      every other one is tested against.

    ``SinkWindowAttention`` is vLLM's ``Attention`` layer with this backend and
    a ``SinkWindowSpec`` as its KV cache spec, so vLLM puts lazy layers in their
    own KV cache group with its own block tables.

Constraints
    Decoder self-attention only. KV cache dtype ``auto`` (the model dtype);
    ``fp8`` too on CUDA (Triton path, vLLM's per-layer scales). CUDA graphs:
    declared ``UNIFORM_SINGLE_TOKEN_DECODE`` on CUDA with Triton (decode
    batches are captured; the metadata is slices of vLLM's persistent
    buffers and the kernel never syncs with the host), ``NEVER`` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec, get_kv_quant_mode

from vllm_lighttransfer.attention import cpu_kernel
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
    # fp8 only on CUDA (Triton path); SinkWindowAttention refuses it elsewhere.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "fp8", "fp8_e4m3"]

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


# Which kernel a builder's layers run (see the module docstring).
PATH_CPU = "cpu"
PATH_TRITON = "triton"
PATH_TORCH = "torch"


def select_path(device: torch.device) -> str:
    if device.type == "cpu" and cpu_kernel.available():
        return PATH_CPU
    if device.type == "cuda":
        from vllm_lighttransfer.attention import triton_sink_window  # imports triton: CUDA only

        if triton_sink_window.HAS_TRITON:
            return PATH_TRITON
    return PATH_TORCH


@dataclass
class SinkWindowMetadata:
    num_actual_tokens: int
    num_reqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_table: torch.Tensor  # [R, max_blocks] int32
    path: str
    # The plain-PyTorch path's plan: built by the builder for that path, or
    # on first use by a layer the fast path cannot take, then shared.
    plan: SinkWindowPlan | None = None


def plan_for(
    meta: SinkWindowMetadata, block_size: int, sink_tokens: int, window_tokens: int,
    num_kv_heads: int, num_queries_per_kv: int,
) -> SinkWindowPlan:
    """The plain-PyTorch path's plan for a step (shared by every lazy layer)."""
    return plan_sink_window(
        query_start_loc=meta.query_start_loc,
        seq_lens=meta.seq_lens,
        block_table=meta.block_table,
        block_size=block_size,
        sink_tokens=sink_tokens,
        window_tokens=window_tokens,
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
        num_kv_heads=num_kv_heads,
        num_queries_per_kv=num_queries_per_kv,
    )


class SinkWindowMetadataBuilder(AttentionMetadataBuilder[SinkWindowMetadata]):
    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec: KVCacheSpec) -> AttentionCGSupport:
        # Decode batches only until a GPU run has shown mixed batches under
        # FULL graphs too (the kernel's grid would allow them).
        if select_path(torch.device(vllm_config.device_config.device_type)) == PATH_TRITON:
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

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
        self.path = select_path(device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SinkWindowMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        meta = SinkWindowMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_reqs=num_reqs,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            # Slices of vLLM's persistent buffers, no copies (CUDA graphs).
            query_start_loc=cm.query_start_loc[: num_reqs + 1],
            seq_lens=cm.seq_lens[:num_reqs],
            block_table=cm.block_table_tensor[:num_reqs],
            path=self.path,
        )
        if self.path == PATH_TORCH:
            meta.plan = plan_for(
                meta, self.block_size, self.sink_tokens, self.window_tokens,
                self.num_kv_heads, self.num_queries_per_kv,
            )
        return meta


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
        meta = attn_metadata
        n = meta.num_actual_tokens
        if meta.path == PATH_CPU and cpu_kernel.supports(query, kv_cache):
            return cpu_kernel.cpu_sink_window_attention(
                query[:n], kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_table,
                self.sink_tokens, self.window_tokens, self.scale, output,
            )
        if meta.path == PATH_TRITON:
            from vllm_lighttransfer.attention import triton_sink_window

            # The whole (padded) query: rows past query_start_loc[num_reqs]
            # are left as they are; the grid depends on host ints only.
            return triton_sink_window.sink_window_attention_triton(
                query, self._cache_view(kv_cache), meta.query_start_loc, meta.seq_lens,
                meta.block_table, kv_cache.shape[2], self.sink_tokens, self.window_tokens,
                self.scale, output, meta.max_query_len, meta.num_reqs,
                k_scale=getattr(layer, "_k_scale", None), v_scale=getattr(layer, "_v_scale", None),
            )
        if meta.plan is None:
            meta.plan = plan_for(
                meta, kv_cache.shape[2], self.sink_tokens, self.window_tokens,
                self.num_kv_heads, self.num_heads // self.num_kv_heads,
            )
        return sink_window_attention(query[:n], kv_cache, meta.plan, self.scale, output)

    def _cache_view(self, kv_cache: torch.Tensor) -> torch.Tensor:
        # vLLM allocates an fp8 cache as uint8; the kernel reads float8_e4m3fn.
        if self.kv_cache_dtype.startswith("fp8") and kv_cache.dtype == torch.uint8:
            return kv_cache.view(torch.float8_e4m3fn)
        return kv_cache

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if self.kv_cache_dtype.startswith("fp8"):
            from vllm_lighttransfer.attention import triton_sink_window

            triton_sink_window.write_kv_quantized(
                self._cache_view(kv_cache), key, value, slot_mapping,
                getattr(layer, "_k_scale", None), getattr(layer, "_v_scale", None),
            )
        else:
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
        if cache_config is not None and cache_config.cache_dtype != "auto":
            from vllm.platforms import current_platform

            allowed = ("auto",) if not current_platform.is_cuda() else ("auto", "fp8", "fp8_e4m3")
            if cache_config.cache_dtype not in allowed:
                raise ValueError(
                    f"kv_cache_dtype={cache_config.cache_dtype!r} is not supported by "
                    f"LightTransfer lazy layers on this platform; allowed: {', '.join(map(repr, allowed))}"
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
