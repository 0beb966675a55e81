"""Scoring: exact-match retrieval answers, perplexity from prompt logprobs, tables.

What it does
    ``is_correct(text, answer, kind)``: for a ``number`` needle, the answer's
    digits are the first number in the model's continuation (the prompt
    already ends with "The pass key is", so a correct greedy answer starts
    with the key). A longer number that merely contains the key is wrong;
    "97,076" counts as "97076". For a ``word`` needle, the first word of the
    continuation equals the key, case and quotes ignored ("Marigold." and
    "'marigold'" are right, "marigolds" is wrong).
    ``wilson_interval(right, total)``: the Wilson score 95% interval of a
    proportion, the interval every accuracy in the report carries.
    ``token_nlls(prompt_logprobs, token_ids)``: per-token negative
    log-likelihood of a prompt from vLLM's ``prompt_logprobs``.
    ``accuracy_table`` and ``perplexity_rows`` aggregate results per variant.
    Pure Python; imports no vLLM and no torch.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

_NUMBER = re.compile(r"\d(?:[\d,]*\d)?")
_WORD = re.compile(r"[A-Za-z]+")
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (thousands commas dropped), or None."""
    match = _NUMBER.search(text)
    return match.group(0).replace(",", "") if match else None


def first_word(text: str) -> str | None:
    """The first run of letters in ``text``, lower-cased, or None."""
    match = _WORD.search(text)
    return match.group(0).lower() if match else None


def is_correct(text: str, answer: str, kind: str = "number") -> bool:
    if kind == "word":
        return first_word(text) == answer.lower()
    return first_number(text) == answer


def wilson_interval(right: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``right / total`` (fractions in [0, 1]).

    Unlike the normal approximation it never leaves [0, 1] and is not empty
    at 0 or ``total`` right: 10 of 10 gives [0.722, 1], not [1, 1]. With
    ``total == 0`` the interval is the whole [0, 1].
    """
    if total <= 0:
        return 0.0, 1.0
    if not 0 <= right <= total:
        raise ValueError(f"right={right} is not in [0, total={total}]")
    p = right / total
    z2 = z * z
    center = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    # Clamp rounding at the ends: 0 right -> lower bound exactly 0.
    return max(0.0, center - half) if right else 0.0, min(1.0, center + half) if right < total else 1.0


def token_nlls(prompt_logprobs: Sequence[Any], token_ids: Sequence[int]) -> list[float]:
    """``-log p(token_i | tokens_<i)`` for ``i = 1 .. len - 1``.

    ``prompt_logprobs[i]`` is vLLM's entry for prompt position ``i``: None for
    the first token, then a mapping token id -> Logprob (or a float) that
    always holds the prompt's own token.
    """
    if len(prompt_logprobs) != len(token_ids):
        raise ValueError(
            f"{len(prompt_logprobs)} prompt logprobs for {len(token_ids)} tokens"
        )
    out = []
    for i in range(1, len(token_ids)):
        entry = prompt_logprobs[i][token_ids[i]]
        value = getattr(entry, "logprob", entry)
        out.append(-float(value))
    return out


def perplexity(nlls: Iterable[float]) -> float:
    values = list(nlls)
    if not values:
        return float("nan")
    return math.exp(sum(values) / len(values))


def perplexity_rows(
    nlls_by_variant: Mapping[str, Sequence[Sequence[float]]],
    baseline: str,
    far_from: int,
) -> list[dict]:
    """Perplexity per variant over all tokens and over tokens at positions
    ``>= far_from`` (beyond the sink and window, where only lazy layers can
    differ), with ratios to ``baseline``.

    ``nlls_by_variant[v][c][j]`` is the NLL of token ``j + 1`` of chunk ``c``.
    """
    def parts(chunks):
        return (
            perplexity(x for c in chunks for x in c),
            perplexity(x for c in chunks for x in c[far_from - 1 :]),
            perplexity(x for c in chunks for x in c[: far_from - 1]),
        )

    rows = []
    base = nlls_by_variant.get(baseline)
    nan = float("nan")
    base_all, base_far, base_near = parts(base) if base else (nan, nan, nan)
    for name, chunks in nlls_by_variant.items():
        ppl_all, ppl_far, ppl_near = parts(chunks)
        rows.append(
            {
                "variant": name,
                "ppl": ppl_all,
                "ppl_ratio": ppl_all / base_all,
                "ppl_far": ppl_far,
                "ppl_far_ratio": ppl_far / base_far,
                # Positions < sink + window: every variant computes the same
                # attention there, so this ratio is 1 up to kernel rounding.
                "ppl_near_ratio": ppl_near / base_near,
                "tokens": sum(len(c) for c in chunks),
                "far_tokens": sum(max(0, len(c) - (far_from - 1)) for c in chunks),
            }
        )
    return rows


def accuracy_table(records: Iterable[Mapping[str, Any]]) -> dict[str, dict]:
    """Accuracy per variant: per (task, length), per task, overall.

    ``records``: dicts with ``variant``, ``task``, ``length``, ``depth``,
    ``correct`` and optionally ``kind`` (default "number").
    Returns ``{variant: {"cells": {(task, length): (right, total)},
    "tasks": {task: (right, total)}, "kinds": {kind: (right, total)},
    "overall": (right, total), "grid": {(task, length, depth): (right, total)}}}``.
    """
    table: dict[str, dict] = {}
    for r in records:
        entry = table.setdefault(
            r["variant"],
            {"cells": defaultdict(lambda: [0, 0]), "tasks": defaultdict(lambda: [0, 0]),
             "grid": defaultdict(lambda: [0, 0]), "kinds": defaultdict(lambda: [0, 0]),
             "overall": [0, 0]},
        )
        ok = int(bool(r["correct"]))
        for bucket in (
            entry["cells"][(r["task"], r["length"])],
            entry["tasks"][r["task"]],
            entry["grid"][(r["task"], r["length"], r["depth"])],
            entry["kinds"][r.get("kind", "number")],
            entry["overall"],
        ):
            bucket[0] += ok
            bucket[1] += 1
    for entry in table.values():
        for key in ("cells", "tasks", "grid", "kinds"):
            entry[key] = {k: tuple(v) for k, v in entry[key].items()}
        entry["overall"] = tuple(entry["overall"])
    return table


def pct(right_total: tuple[int, int] | None) -> float | None:
    if not right_total or right_total[1] == 0:
        return None
    return 100.0 * right_total[0] / right_total[1]


def probe_key(record: Mapping[str, Any]) -> tuple:
    return (record["task"], record["length"], record["depth"], record["sample"])


def baseline_comparison(
    records: Sequence[Mapping[str, Any]], variant: str, baseline: str = "full"
) -> dict[str, Any]:
    """How ``variant`` does on the probes it shares with ``baseline``.

    ``probes``: probes both ran; ``baseline_right``: how many of them the
    baseline answered; ``kept``: how many of *those* the variant answered
    too (what a conversion can lose); ``gained``: right where the baseline
    was wrong; ``delta_points``: accuracy difference in points.
    """
    base = {probe_key(r): bool(r["correct"]) for r in records if r["variant"] == baseline}
    mine = {probe_key(r): bool(r["correct"]) for r in records if r["variant"] == variant}
    common = [k for k in mine if k in base]
    base_right = [k for k in common if base[k]]
    kept = sum(mine[k] for k in base_right)
    gained = sum(mine[k] for k in common if not base[k])
    delta = (
        100.0 * (sum(mine[k] for k in common) - sum(base[k] for k in common)) / len(common)
        if common else None
    )
    return {"probes": len(common), "baseline_right": len(base_right), "kept": kept,
            "gained": gained, "delta_points": delta}
