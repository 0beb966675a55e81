"""Plain-PyTorch reference of LightTransfer's semantics: the oracle.

What it does
    ``sink_window_mask`` is the rule itself: token ``t`` attends to key ``k``
    iff ``k <= t and (k < sink or k > t - window)``, on original positions
    (RoPE is applied before caching; nothing is re-indexed).
    ``reference_attention`` applies it densely, to every head or (with
    ``streaming_kv_heads``) to the query heads of the given KV heads only.
    ``ReferenceHybridModel`` runs a transformers Llama/Mistral/Qwen2 model
    with that mask on the streaming heads (all heads of a lazy layer, or the
    ``streaming_kv_heads`` of a layer) and plain causal attention elsewhere:
    no paging, no KV cache, no vLLM.

Constraints
    Dense masks: O(L^2) memory, for tests and small checks only.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vllm_lighttransfer.config import LightTransferConfig


def sink_window_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sink_tokens: int, window_tokens: int
) -> torch.Tensor:
    """Boolean mask ``[len(q_pos), len(k_pos)]``: True where attention is allowed."""
    q = q_pos[:, None]
    k = k_pos[None, :]
    return (k <= q) & ((k < sink_tokens) | (k > q - window_tokens))


def reference_attention(
    query: torch.Tensor,  # [Tq, H, D]
    key: torch.Tensor,  # [Tk, Hkv, D]
    value: torch.Tensor,  # [Tk, Hkv, D]
    q_pos: torch.Tensor,  # [Tq]
    k_pos: torch.Tensor,  # [Tk]
    scale: float,
    sink_tokens: int | None,
    window_tokens: int | None,
    streaming_kv_heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """Dense attention of one sequence; ``sink_tokens=None`` means plain causal.

    ``streaming_kv_heads``: only these KV heads (and their query heads) use
    sink + window, the others plain causal; None: every head streams.
    """
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_heads // num_kv_heads
    k = key.repeat_interleave(group, dim=1).float()
    v = value.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", query.float(), k) * scale
    causal = k_pos[None, :] <= q_pos[:, None]
    if sink_tokens is None:
        mask = causal
    else:
        mask = sink_window_mask(q_pos, k_pos, sink_tokens, window_tokens)
        if streaming_kv_heads is not None:
            stream = torch.zeros(num_heads, dtype=torch.bool)
            for h in streaming_kv_heads:
                stream[h * group : (h + 1) * group] = True
            mask = torch.where(stream[:, None, None], mask[None], causal[None])
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)


def additive_mask(
    seq_len: int, sink_tokens: int | None, window_tokens: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """``[1, 1, L, L]`` additive mask (0 allowed, -inf blocked) for one sequence."""
    pos = torch.arange(seq_len)
    if sink_tokens is None:
        allowed = pos[None, :] <= pos[:, None]
    else:
        allowed = sink_window_mask(pos, pos, sink_tokens, window_tokens)
    mask = torch.zeros(seq_len, seq_len, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class ReferenceHybridModel:
    """A transformers causal LM whose lazy layers use the sink+window mask.

    Implemented with a custom attention function registered in transformers'
    ``AttentionInterface``: each layer's module knows its ``layer_idx``, so the
    function picks the causal or the sink+window mask per layer and runs eager
    softmax attention in float32.
    """

    _ATTN_NAME = "lighttransfer_reference"

    def __init__(self, model: torch.nn.Module, cfg: LightTransferConfig | None):
        from transformers import AttentionInterface

        self.model = model.eval()
        self.cfg = cfg
        AttentionInterface.register(self._ATTN_NAME, self._attention)
        self.model.config._attn_implementation = self._ATTN_NAME
        for module in self.model.modules():
            if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
                module.config._attn_implementation = self._ATTN_NAME
        self._masks: dict[tuple[int, bool], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str, cfg: LightTransferConfig | None, dtype=torch.float32):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, cfg)

    def _mask(self, seq_len: int, lazy: bool, dtype: torch.dtype) -> torch.Tensor:
        key = (seq_len, lazy)
        if key not in self._masks:
            if lazy:
                self._masks[key] = additive_mask(
                    seq_len, self.cfg.sink_tokens, self.cfg.window_tokens, torch.float32
                )
            else:
                self._masks[key] = additive_mask(seq_len, None, None, torch.float32)
        return self._masks[key]

    def _layer_mask(self, layer_idx: int, seq_len: int, num_kv_heads: int, group: int) -> torch.Tensor:
        """``[1, 1 or H, L, L]``: sink + window on the layer's streaming heads."""
        heads = self.cfg.streaming_heads(layer_idx) if self.cfg is not None else ()
        if self.cfg is not None and self.cfg.is_lazy(layer_idx):
            return self._mask(seq_len, True, torch.float32)
        if not heads:
            return self._mask(seq_len, False, torch.float32)
        stream = torch.zeros(num_kv_heads, dtype=torch.bool)
        stream[list(heads)] = True
        stream = stream.repeat_interleave(group)[None, :, None, None]
        return torch.where(stream, self._mask(seq_len, True, torch.float32),
                           self._mask(seq_len, False, torch.float32))

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query: [B, H, L, D]; key/value: [B, Hkv, L, D]
        layer_idx = module.layer_idx
        seq_len = query.shape[2]
        group = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(group, dim=1).float()
        v = value.repeat_interleave(group, dim=1).float()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
        scores = scores + self._layer_mask(layer_idx, seq_len, key.shape[1], group)
        probs = scores.softmax(dim=-1)
        out = torch.matmul(probs, v).to(query.dtype)  # [B, H, L, D]
        return out.transpose(1, 2).contiguous(), probs

    @torch.no_grad()
    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([list(token_ids)])
        return self.model(input_ids=ids, use_cache=False).logits[0].float()

    @torch.no_grad()
    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation recomputed from scratch each step (no KV cache)."""
        ids = list(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(self.logits(ids)[-1].argmax())
            out.append(nxt)
            ids.append(nxt)
        return out
