"""Lazy-layer scores: how much attention a layer puts on sinks and recent keys.

What it does
    Runs a transformers causal LM over calibration prompts and, per layer,
    measures the attention mass of the last ``n_last`` queries on the first
    ``sink_tokens`` keys and the last ``window_tokens`` keys (paper Sec. 3,
    official code sail-sg/SimLayerKV). Higher = lazier. Imports no vLLM.

The score, exactly
    For one prompt of ``L`` tokens (positions ``0 .. L-1``) and one layer::

        Q = {L - n, ..., L - 1}                  n = min(n_last, L)
        S = [0, sink) U [L - window, L)          the retained keys
        p_h,t(k) = softmax_k<=t(q_h,t . k_k * scale)   causal, post-RoPE
        score = mean over heads h and queries t in Q of  sum_{k in S, k<=t} p_h,t(k)

    The window is anchored at the end of the *sequence*, the same keys for
    every scored query; it is not re-anchored at each query ``t``. That is
    SimLayerKV's decode-time score (``attn[..., 0:4]`` plus
    ``attn[..., -1024:]`` for the first generated token) generalized to
    ``n_last`` queries; with ``n_last=1`` it is that score exactly (S is a
    union, so keys in both parts are counted once). For ``t < L - 1`` the
    serving mask would keep ``window - (L - 1 - t)`` more keys at the far edge
    than S does, so S is the stricter of the two by at most ``n_last - 1``
    keys per query: a lazy score never flatters a layer.

Per KV head
    The same mass, averaged over the query heads that read one KV head
    (GQA: query head ``j`` reads KV head ``j // (H / Hkv)``, transformers'
    ``repeat_kv`` order): ``LayerScores.per_kv_head``, ``[prompts, layers,
    Hkv]``. Every KV head has the same number of query heads, so the mean of
    a layer's KV-head scores is its layer score; the layer score itself is
    still computed as the mean over all query heads, unchanged.

Memory
    The model runs its normal attention (transformers' SDPA path, which never
    builds an ``L x L`` matrix on CPU). A custom attention function registered
    with ``transformers.AttentionInterface`` sees each layer's post-RoPE
    query and key states and computes only the ``n x L`` logits of the scored
    queries per head, in float32: for SmolLM2 (9 heads) at 8K tokens and
    ``n_last=32`` that is 9 MB per layer, released before the next layer.

Constraints
    One prompt at a time, no padding (batch 1). Every prompt must be longer
    than ``sink_tokens + window_tokens``, otherwise S holds every key and the
    score is 1 for every layer. Models must use transformers' functional
    attention interface (Llama, Mistral, Qwen2, Qwen3 do). The score assumes
    full causal attention: for a model with a native sliding window, keep the
    calibration length within that window.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from vllm_lighttransfer.config import LightTransferConfigError

logger = logging.getLogger(__name__)

ATTN_NAME = "lighttransfer_scoring"


def validate_scoring_settings(
    sink_tokens: int,
    window_tokens: int,
    n_last: int,
    calibration_length: int | None = None,
    max_position_embeddings: int | None = None,
) -> None:
    """Raise ``LightTransferConfigError`` naming the first setting out of range."""
    if sink_tokens < 0:
        raise LightTransferConfigError(f"--sink-tokens={sink_tokens}: expected an integer >= 0")
    if window_tokens < 1:
        raise LightTransferConfigError(
            f"--window-tokens={window_tokens}: expected an integer >= 1"
        )
    if n_last < 1:
        raise LightTransferConfigError(f"--n-last={n_last}: expected an integer >= 1")
    if max_position_embeddings is not None:
        if sink_tokens + window_tokens >= max_position_embeddings:
            raise LightTransferConfigError(
                f"--sink-tokens {sink_tokens} + --window-tokens {window_tokens} = "
                f"{sink_tokens + window_tokens}: must be below the model's "
                f"max_position_embeddings {max_position_embeddings}, or no layer gains anything"
            )
        if calibration_length is not None and calibration_length > max_position_embeddings:
            raise LightTransferConfigError(
                f"--calibration-length {calibration_length} exceeds the model's "
                f"max_position_embeddings {max_position_embeddings}"
            )
    if calibration_length is not None:
        check_prompt_length(calibration_length, sink_tokens, window_tokens, n_last)


def check_prompt_length(length: int, sink_tokens: int, window_tokens: int, n_last: int) -> None:
    if length <= sink_tokens + window_tokens:
        raise LightTransferConfigError(
            f"calibration prompt of {length} tokens is not longer than --sink-tokens "
            f"{sink_tokens} + --window-tokens {window_tokens} = {sink_tokens + window_tokens}: "
            "every key would be retained and every layer would score 1; use a --calibration-length "
            f"above {sink_tokens + window_tokens} (and calibration text at least that long)"
        )
    if n_last > length:
        raise LightTransferConfigError(
            f"--n-last={n_last}: exceeds the calibration prompt length {length}"
        )


def retained_mass(
    query: torch.Tensor,  # [B, H, L, D] post-RoPE
    key: torch.Tensor,  # [B, Hkv, L, D] post-RoPE
    scaling: float,
    sink_tokens: int,
    window_tokens: int,
    n_last: int,
) -> torch.Tensor:
    """Per-head retained attention mass, averaged over the last ``n_last`` queries.

    Returns ``[B, H]`` in float32. Builds only ``[B, H, n, L]`` logits.
    """
    batch, num_heads, seq_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    n = min(n_last, seq_len)
    # Query head h reads KV head h // group (transformers' repeat_kv order), so
    # grouping the query heads per KV head needs no copy of the keys.
    q = query[:, :, seq_len - n :, :].float().reshape(batch, num_kv_heads, group * n, head_dim)
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # [B, Hkv, G*n, L]
    logits = logits.view(batch, num_heads, n, seq_len)
    k_pos = torch.arange(seq_len, device=query.device)
    q_pos = torch.arange(seq_len - n, seq_len, device=query.device)
    logits.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))  # causal
    probs = logits.softmax(dim=-1)
    retained = (k_pos < sink_tokens) | (k_pos >= seq_len - window_tokens)  # S, a union
    mass = probs[..., retained].sum(dim=-1)  # [B, H, n]
    return mass.mean(dim=-1)


@dataclass
class _Collector:
    sink_tokens: int
    window_tokens: int
    n_last: int
    num_layers: int
    per_head: dict[int, torch.Tensor] = field(default_factory=dict)
    num_kv_heads: int = 0
    progress: Any = None

    def record(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        with torch.no_grad():
            mass = retained_mass(
                query, key, scaling, self.sink_tokens, self.window_tokens, self.n_last
            )
        self.per_head[layer_idx] = mass[0].cpu()
        self.num_kv_heads = key.shape[1]
        if self.progress is not None:
            self.progress.update(1)


_ACTIVE: contextvars.ContextVar[_Collector | None] = contextvars.ContextVar(
    "lighttransfer_scoring_collector", default=None
)


def _scoring_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA attention that also hands this layer's post-RoPE q/k to the collector."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    collector = _ACTIVE.get()
    if collector is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        collector.record(module.layer_idx, query, key, scale)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _scoring_attention)
    # Same masks as SDPA (none at all for one unpadded causal prompt).
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


@contextlib.contextmanager
def _scoring_attention_enabled(model: torch.nn.Module) -> Iterator[None]:
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@dataclass(frozen=True)
class LayerScores:
    """Scores of every layer on every calibration prompt."""

    per_head: torch.Tensor  # [prompts, layers, heads], float32; query heads
    num_kv_heads: int
    sink_tokens: int
    window_tokens: int
    n_last: int
    prompt_lengths: tuple[int, ...]
    seconds: float

    @property
    def per_prompt(self) -> torch.Tensor:  # [prompts, layers]
        return self.per_head.mean(dim=-1)

    @property
    def per_kv_head(self) -> torch.Tensor:  # [prompts, layers, kv_heads]
        prompts, layers, heads = self.per_head.shape
        group = heads // self.num_kv_heads
        return self.per_head.view(prompts, layers, self.num_kv_heads, group).mean(dim=-1)

    @property
    def mean(self) -> list[float]:
        return self.per_prompt.mean(dim=0).tolist()

    @property
    def kv_head_mean(self) -> list[list[float]]:  # [layers][kv_heads]
        return self.per_kv_head.mean(dim=0).tolist()

    @property
    def std(self) -> list[float]:
        if self.per_prompt.shape[0] < 2:
            return [0.0] * self.per_prompt.shape[1]
        return self.per_prompt.std(dim=0).tolist()


def load_model(path: str, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """Load a causal LM for scoring (transformers shows a loading progress bar)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise LightTransferConfigError(f"--dtype={dtype}: not a torch dtype")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, attn_implementation="sdpa"
        )
    except RuntimeError as exc:  # e.g. an unavailable device later; keep one line
        raise LightTransferConfigError(f"cannot load {path}: {str(exc).splitlines()[0]}") from exc
    return model.to(device).eval()


@torch.no_grad()
def score_layers(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    sink_tokens: int,
    window_tokens: int,
    n_last: int,
    progress: bool = True,
) -> LayerScores:
    """Score every layer of ``model`` on each prompt (see module doc)."""
    from tqdm.auto import tqdm

    if not prompts:
        raise LightTransferConfigError("no calibration prompts to score")
    validate_scoring_settings(sink_tokens, window_tokens, n_last)
    for p in prompts:
        check_prompt_length(len(p), sink_tokens, window_tokens, n_last)
    num_layers = model.config.num_hidden_layers
    device = next(model.parameters()).device
    rows = []
    num_kv_heads = 0
    start = time.perf_counter()
    bar = tqdm(
        total=len(prompts) * num_layers, desc="Scoring layers", unit="layer", disable=not progress
    )
    try:
        with _scoring_attention_enabled(model):
            for i, prompt in enumerate(prompts):
                bar.set_postfix(prompt=f"{i + 1}/{len(prompts)}")
                collector = _Collector(sink_tokens, window_tokens, n_last, num_layers, progress=bar)
                token = _ACTIVE.set(collector)
                try:
                    ids = torch.tensor([list(prompt)], device=device)
                    # The decoder only: the LM head's logits are not needed.
                    model.base_model(input_ids=ids, use_cache=False)
                finally:
                    _ACTIVE.reset(token)
                missing = sorted(set(range(num_layers)) - set(collector.per_head))
                if missing:
                    raise LightTransferConfigError(
                        f"layers {missing} never reached the scoring attention: "
                        f"{type(model).__name__} does not use transformers' AttentionInterface"
                    )
                rows.append(torch.stack([collector.per_head[l] for l in range(num_layers)]))
                num_kv_heads = collector.num_kv_heads
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    logger.info("scored %d layers on %d prompts in %.1f s", num_layers, len(prompts), seconds)
    return LayerScores(
        per_head=torch.stack(rows),
        num_kv_heads=num_kv_heads,
        sink_tokens=sink_tokens,
        window_tokens=window_tokens,
        n_last=n_last,
        prompt_lengths=tuple(len(p) for p in prompts),
        seconds=seconds,
    )
