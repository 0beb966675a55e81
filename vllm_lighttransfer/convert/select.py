"""Choose the lazy layers (or streaming KV heads) from their scores.

What it does
    Turns per-prompt layer scores (see ``scoring.py``; higher = lazier) into
    the fixed ``lazy_layers`` list a converted model carries;
    ``select_heads`` does the same for per-KV-head scores and returns the
    ``streaming_kv_heads`` of a format-2 folder (``--granularity head``).
    Pure Python, no torch, no vLLM: tests run in microseconds.

Rules
    * ``lazy_ratio`` (paper default 0.5): ``k = round_half_up(ratio * layers)``
      layers, at least 1. Each prompt flags its own top ``k`` layers; a layer's
      ``lazy_frequency`` is the fraction of prompts that flag it (the paper's
      offline variant: count how often each layer is lazy across calibration
      data). The ``k`` layers with the highest frequency are chosen.
    * ``threshold``: a prompt flags a layer whose score is ``>= threshold``;
      the chosen layers are those whose *mean* score is ``>= threshold``
      (SimLayerKV's rule, applied to the calibration mean; its LongBench runs
      use 0.65 to 0.9 with ``sink=4, window=1024, n_last=1``).
    * Ranking, laziest first, is by frequency, then mean score, then the
      lower layer index: a total order, so ties are broken deterministically
      and the same scores always give the same layers.
    * Per KV head (``select_heads``): the same rules over every
      ``(layer, KV head)`` pair, pair ``(l, h)`` being unit ``l * Hkv + h``:
      ``lazy_ratio`` is the fraction of all pairs that stream, ``threshold``
      applies to each pair's mean score, ties go to the lower layer, then the
      lower head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vllm_lighttransfer.config import LightTransferConfigError


@dataclass(frozen=True)
class Selection:
    lazy_layers: tuple[int, ...]  # sorted
    ranking: tuple[int, ...]  # every layer, laziest first
    mean_scores: tuple[float, ...]
    lazy_frequency: tuple[float, ...]
    rule: str  # "lazy_ratio" | "threshold"
    value: float

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            self.rule: self.value,
            "lazy_layers": list(self.lazy_layers),
            "ranking": list(self.ranking),
        }


def check_lazy_ratio(ratio: float) -> None:
    if not 0.0 < ratio <= 1.0:
        raise LightTransferConfigError(f"--lazy-ratio={ratio}: expected a value in (0, 1]")


def check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise LightTransferConfigError(f"--threshold={threshold}: expected a value in [0, 1]")


def num_lazy(num_layers: int, ratio: float) -> int:
    """``ratio * num_layers`` rounded half up, at least 1 (ratio in (0, 1])."""
    check_lazy_ratio(ratio)
    return max(1, min(num_layers, int(ratio * num_layers + 0.5)))


def _mean(per_prompt: Sequence[Sequence[float]]) -> list[float]:
    n = len(per_prompt)
    return [sum(row[l] for row in per_prompt) / n for l in range(len(per_prompt[0]))]


def rank_layers(mean_scores: Sequence[float], frequency: Sequence[float] | None = None) -> list[int]:
    """Every layer, laziest first: frequency, then mean score, then lower index."""
    freq = frequency if frequency is not None else [0.0] * len(mean_scores)
    return sorted(range(len(mean_scores)), key=lambda l: (-freq[l], -mean_scores[l], l))


def _check_scores(per_prompt: Sequence[Sequence[float]]) -> None:
    if not per_prompt or not per_prompt[0]:
        raise LightTransferConfigError("no layer scores to select from")
    width = len(per_prompt[0])
    if any(len(row) != width for row in per_prompt):
        raise LightTransferConfigError("every prompt must score the same number of layers")


def select_by_ratio(per_prompt: Sequence[Sequence[float]], lazy_ratio: float) -> Selection:
    """Choose ``num_lazy(layers, lazy_ratio)`` layers (see module doc)."""
    _check_scores(per_prompt)
    num_layers = len(per_prompt[0])
    k = num_lazy(num_layers, lazy_ratio)
    counts = [0] * num_layers
    for row in per_prompt:
        for layer in rank_layers(row)[:k]:
            counts[layer] += 1
    frequency = [c / len(per_prompt) for c in counts]
    mean = _mean(per_prompt)
    ranking = rank_layers(mean, frequency)
    return Selection(
        lazy_layers=tuple(sorted(ranking[:k])),
        ranking=tuple(ranking),
        mean_scores=tuple(mean),
        lazy_frequency=tuple(frequency),
        rule="lazy_ratio",
        value=lazy_ratio,
    )


def select_by_threshold(per_prompt: Sequence[Sequence[float]], threshold: float) -> Selection:
    """Choose the layers whose mean score is ``>= threshold`` (see module doc)."""
    check_threshold(threshold)
    _check_scores(per_prompt)
    num_layers = len(per_prompt[0])
    frequency = [
        sum(row[l] >= threshold for row in per_prompt) / len(per_prompt)
        for l in range(num_layers)
    ]
    mean = _mean(per_prompt)
    return Selection(
        lazy_layers=tuple(l for l in range(num_layers) if mean[l] >= threshold),
        ranking=tuple(rank_layers(mean, frequency)),
        mean_scores=tuple(mean),
        lazy_frequency=tuple(frequency),
        rule="threshold",
        value=threshold,
    )


@dataclass(frozen=True)
class HeadSelection:
    """``Selection`` per ``(layer, KV head)`` pair; lists are ``[layer][kv_head]``."""

    streaming_kv_heads: tuple[tuple[int, ...], ...]  # per layer, sorted
    ranking: tuple[tuple[int, int], ...]  # every (layer, kv_head), laziest first
    mean_scores: tuple[tuple[float, ...], ...]
    lazy_frequency: tuple[tuple[float, ...], ...]
    rule: str  # "lazy_ratio" | "threshold"
    value: float

    @property
    def num_streaming(self) -> int:
        return sum(len(h) for h in self.streaming_kv_heads)

    def to_dict(self) -> dict:
        return {
            "granularity": "head",
            "rule": self.rule,
            self.rule: self.value,
            "streaming_kv_heads": [list(h) for h in self.streaming_kv_heads],
            "ranking": [list(p) for p in self.ranking],
        }


def select_heads(
    per_prompt_heads: Sequence[Sequence[Sequence[float]]], rule: str, value: float
) -> HeadSelection:
    """Choose streaming KV heads from ``[prompts][layers][kv_heads]`` scores by
    ``rule`` ("lazy_ratio" or "threshold", see module doc)."""
    if not per_prompt_heads or not per_prompt_heads[0] or not per_prompt_heads[0][0]:
        raise LightTransferConfigError("no KV-head scores to select from")
    num_layers, num_kv = len(per_prompt_heads[0]), len(per_prompt_heads[0][0])
    if any(len(layer) != num_kv for row in per_prompt_heads for layer in row):
        raise LightTransferConfigError("every layer must score the same number of KV heads")
    flat = [[s for layer in row for s in layer] for row in per_prompt_heads]
    if rule == "lazy_ratio":
        sel = select_by_ratio(flat, value)
    elif rule == "threshold":
        sel = select_by_threshold(flat, value)
    else:
        raise ValueError(f"rule={rule!r}: expected 'lazy_ratio' or 'threshold'")
    chosen = set(sel.lazy_layers)  # units l * num_kv + h

    def grid(values: Sequence[float]) -> tuple[tuple[float, ...], ...]:
        return tuple(tuple(values[l * num_kv : (l + 1) * num_kv]) for l in range(num_layers))

    return HeadSelection(
        streaming_kv_heads=tuple(
            tuple(h for h in range(num_kv) if l * num_kv + h in chosen) for l in range(num_layers)
        ),
        ranking=tuple(divmod(u, num_kv) for u in sel.ranking),
        mean_scores=grid(sel.mean_scores),
        lazy_frequency=grid(sel.lazy_frequency),
        rule=rule,
        value=value,
    )


def parse_layers(text: str, num_layers: int) -> list[int]:
    """Parse ``"1,3,5"`` (spaces allowed; empty for none) into sorted layer indices."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        layers = [int(t) for t in items]
    except ValueError:
        raise LightTransferConfigError(
            f"--layers={text!r}: expected comma-separated integers such as 1,3,5"
        ) from None
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise LightTransferConfigError(
            f"--layers contains {bad}: indices must be in [0, {num_layers - 1}]"
        )
    dup = sorted({l for l in layers if layers.count(l) > 1})
    if dup:
        raise LightTransferConfigError(f"--layers repeats {dup}: indices must be unique")
    return sorted(layers)
