"""Scoring: exact-match retrieval answers, perplexity from prompt logprobs, tables.

What it does
    ``is_correct(text, answer)``: the answer's digits are the first number in
    the model's continuation (the prompt already ends with "The pass key is",
    so a correct greedy answer starts with the key). A longer number that
    merely contains the key is wrong; "97,076" counts as "97076".
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


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (thousands commas dropped), or None."""
    match = _NUMBER.search(text)
    return match.group(0).replace(",", "") if match else None


def is_correct(text: str, answer: str) -> bool:
    return first_number(text) == answer


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

    ``records``: dicts with ``variant``, ``task``, ``length``, ``depth``, ``correct``.
    Returns ``{variant: {"cells": {(task, length): (right, total)},
    "tasks": {task: (right, total)}, "overall": (right, total),
    "grid": {(task, length, depth): (right, total)}}}``.
    """
    table: dict[str, dict] = {}
    for r in records:
        entry = table.setdefault(
            r["variant"],
            {"cells": defaultdict(lambda: [0, 0]), "tasks": defaultdict(lambda: [0, 0]),
             "grid": defaultdict(lambda: [0, 0]), "overall": [0, 0]},
        )
        ok = int(bool(r["correct"]))
        for bucket in (
            entry["cells"][(r["task"], r["length"])],
            entry["tasks"][r["task"]],
            entry["grid"][(r["task"], r["length"], r["depth"])],
            entry["overall"],
        ):
            bucket[0] += ok
            bucket[1] += 1
    for entry in table.values():
        for key in ("cells", "tasks", "grid"):
            entry[key] = {k: tuple(v) for k, v in entry[key].items()}
        entry["overall"] = tuple(entry["overall"])
    return table


def pct(right_total: tuple[int, int] | None) -> float | None:
    if not right_total or right_total[1] == 0:
        return None
    return 100.0 * right_total[0] / right_total[1]
