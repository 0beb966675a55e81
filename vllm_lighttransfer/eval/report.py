"""Evaluation outputs: the markdown tables, JSON summary and heatmaps.

What it does
    ``write_outputs(out, results, ...)`` writes, under ``out``:
    ``records.jsonl`` (every probe's answer), ``summary.json``, ``summary.md``
    (accuracy per task and length, perplexity ratios, targets, runtime),
    ``heatmap_<variant>.png`` (depth x length, one panel per task) and
    ``heatmaps_all.png`` (every variant side by side). Accuracy differences
    against the unconverted model are taken on the same probes, so a variant
    that skipped the longest length is compared on what it ran.

Statistics
    Every accuracy carries its Wilson 95% interval (``scoring.wilson_interval``):
    with 8 probes per cell a cell at 50% spans 22-78%, so read differences
    smaller than the intervals as noise. Each variant row also says how many
    of its probes the unconverted model answered (``full right``) and how
    many of *those* the variant kept: a conversion can only lose what the
    model knew, and a variant that "loses 10 points" of a model that
    answered 3 probes has lost nothing measurable.

Same KV bytes
    Each row says what streams (``15 of 30 layers``, ``45 of 90 KV heads``),
    the fraction of ``(layer, KV head)`` pairs that stream
    (``LightTransferConfig.lazy_fraction``: a lazy layer counts all of its
    KV heads) and the KV bytes a request of the longest probe length saves
    (``1 - config.kv_bytes_ratio``). ``score-50`` and ``head-50`` on the
    same model show the same two numbers: rows of equal numbers compare
    per-layer and per-head selection at equal memory. The model's shape
    comes from ``settings`` (``num_layers``, ``num_kv_heads``,
    ``base_architecture``); without it the two columns read "n/a".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from vllm_lighttransfer.config import LightTransferConfig, LightTransferConfigError, kv_bytes_ratio
from vllm_lighttransfer.eval.scoring import (
    accuracy_table,
    baseline_comparison,
    pct,
    perplexity_rows,
    wilson_interval,
)

BASELINE = "full"


def length_label(n: int) -> str:
    return f"{n / 1024:g}K" if n % 1024 == 0 else str(n)


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def with_interval(right_total: tuple[int, int] | None) -> str:
    """``"75 (41-93)"``: accuracy in percent and its Wilson 95% interval."""
    if not right_total or right_total[1] == 0:
        return "n/a"
    lo, hi = wilson_interval(*right_total)
    return f"{pct(right_total):.0f} ({100 * lo:.0f}-{100 * hi:.0f})"


def _same_probe_delta(records: Sequence[dict], variant: str, task: str | None = None) -> float | None:
    """Accuracy of ``variant`` minus the baseline's, on the probes both ran."""
    key = lambda r: (r["task"], r["length"], r["depth"], r["sample"])  # noqa: E731
    base = {key(r): r["correct"] for r in records if r["variant"] == BASELINE}
    mine = {key(r): r["correct"] for r in records if r["variant"] == variant}
    common = [k for k in mine if k in base and (task is None or k[0] == task)]
    if not common:
        return None
    return 100.0 * (sum(mine[k] for k in common) - sum(base[k] for k in common)) / len(common)


def variant_config(variant: Any, settings: dict) -> LightTransferConfig | None:
    """``variant`` as the plugin reads its folder; None when unconverted or
    when ``settings`` lacks the model's shape."""
    num_layers, num_kv = settings.get("num_layers"), settings.get("num_kv_heads")
    if variant.lazy_layers is None or not num_layers or not num_kv:
        return None
    heads = variant.streaming_kv_heads
    section = {"format_version": 1 if heads is None else 2,
               "lazy_layers": list(variant.lazy_layers),
               "sink_tokens": settings["sink_tokens"], "window_tokens": settings["window_tokens"]}
    if heads is not None:
        section["streaming_kv_heads"] = [list(h) for h in heads]
    try:
        return LightTransferConfig.validate(
            section, num_layers, settings.get("base_architecture"), num_kv_heads=num_kv
        )
    except LightTransferConfigError:
        return None


def streaming_columns(variant: Any, settings: dict) -> dict[str, Any]:
    """What ``variant`` streams and what it saves (see module doc, "Same KV bytes")."""
    num_layers, num_kv = settings.get("num_layers"), settings.get("num_kv_heads")
    heads = variant.streaming_kv_heads
    if variant.lazy_layers is None:
        return {"streams": "none", "fraction": 0.0, "kv_bytes_saved": 0.0}
    if heads is None:
        n = len(variant.lazy_layers)
        streams = f"{n} of {num_layers} layers" if num_layers else str(n)
    else:
        n = variant.streaming_pairs(num_kv or 0)
        streams = f"{n} of {num_layers * num_kv} KV heads" if num_layers and num_kv else f"{n} KV heads"
    cfg = variant_config(variant, settings)
    if cfg is None:
        return {"streams": streams, "fraction": None, "kv_bytes_saved": None}
    context = max(settings["lengths"])
    return {"streams": streams, "fraction": cfg.lazy_fraction,
            "kv_bytes_saved": 1.0 - kv_bytes_ratio(cfg, context)}


def _pct_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def heatmap_figure(grid: dict, tasks: Sequence[str], lengths: Sequence[int],
                   depths: Sequence[float], title: str, axes=None, fig=None,
                   window: int | None = None):
    """Draw one variant's panels (one per task); returns the figure.

    With ``window``, cells whose needle lies farther back than the window
    (``(1 - depth) * length > window``: a lazy layer cannot see it) get a "*".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if axes is None:
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 0.8, 3.2),
                                 squeeze=False)
        axes = axes[0]
        fig.suptitle(title, fontsize=10)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d0d0d0")
    for ax, task in zip(axes, tasks):
        data = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                cell = grid.get((task, n, d))
                if cell:
                    data[i, j] = 100.0 * cell[0] / cell[1]
        ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                text = "n/a" if np.isnan(data[i, j]) else f"{data[i, j]:.0f}"
                if window is not None and (1 - depths[i]) * lengths[j] > window:
                    text += "*"
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
        ax.set_xlabel("prompt length (tokens)", fontsize=8)
        ax.set_ylabel("needle depth", fontsize=8)
        ax.set_title(f"{task}", fontsize=9)
    return fig


def write_heatmaps(out: Path, table: dict, variants: Sequence[str], tasks: Sequence[str],
                   lengths: Sequence[int], depths: Sequence[float],
                   window: int | None = None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name in variants:
        if name not in table:
            continue
        fig = heatmap_figure(table[name]["grid"], tasks, lengths, depths,
                             f"{name}: exact-match accuracy (%)"
                             + (f"; * needle beyond the {window}-token window" if window else ""),
                             window=window)
        fig.tight_layout()
        path = out / f"heatmap_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path.name)
    shown = [n for n in variants if n in table]
    if shown:
        fig, axes = plt.subplots(len(tasks), len(shown),
                                 figsize=(2.1 * len(shown) + 0.6, 2.6 * len(tasks)),
                                 squeeze=False)
        for j, name in enumerate(shown):
            heatmap_figure(table[name]["grid"], tasks, lengths, depths, name,
                           axes=[axes[i][j] for i in range(len(tasks))], fig=fig,
                           window=window)
            for i, task in enumerate(tasks):
                axes[i][j].set_title(f"{name}\n{task}", fontsize=8)
        fig.suptitle("Exact-match accuracy (%) by needle depth and prompt length"
                     + (f" (* needle beyond the {window}-token window)" if window else ""),
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "heatmaps_all.png", dpi=100)
        plt.close(fig)
        files.append("heatmaps_all.png")
    return files


def targets(records: Sequence[dict], ppl: dict[str, dict], tasks: Sequence[str]) -> list[str]:
    """The issue's targets, each with the measured number and met / not met."""
    lines = []
    if "score-50" in {r["variant"] for r in records}:
        for task in list(tasks) + [None]:
            d = _same_probe_delta(records, "score-50", task)
            if d is not None:
                lines.append(
                    f"- score-50 vs full, {task or 'all tasks'}: {d:+.1f} points "
                    f"({'met' if d >= -5 else 'NOT met'}: target within 5 points)"
                )
    if "score-50" in ppl:
        for col, label in (("ppl_ratio", "all tokens"), ("ppl_far_ratio", "tokens beyond the window")):
            r = ppl["score-50"][col]
            lines.append(
                f"- score-50 perplexity ratio, {label}: {r:.4f} "
                f"({'met' if abs(r - 1) <= 0.03 else 'NOT met'}: target within 3%)"
            )
    ref = _same_probe_delta(records, "score-50")
    # Per KV head against per layer at the same fraction of KV heads (same bytes).
    for name in sorted({r["variant"] for r in records if r["variant"].startswith("head-")}):
        d = _same_probe_delta(records, name)
        layer_name = "score-" + name.rsplit("-", 1)[1]
        d_layer = _same_probe_delta(records, layer_name)
        if d is None:
            continue
        versus = (f"; {layer_name} (per layer, same fraction of KV heads): {d_layer:+.1f} points"
                  if d_layer is not None else "")
        lines.append(f"- {name} vs full: {d:+.1f} points{versus}")
    for name in ("stream-all", "least-50", "random-50"):
        d = _same_probe_delta(records, name)
        if d is None:
            continue
        worse = ref is not None and d < ref - 10
        extra = f", perplexity ratio {ppl[name]['ppl_ratio']:.4f}" if name in ppl else ""
        lines.append(
            f"- {name} vs full: {d:+.1f} points{extra} "
            f"({'clearly worse than score-50' if worse else 'not clearly worse than score-50'})"
        )
    return lines


def layer_score_table(scores: dict) -> list[str]:
    """Per-layer laziness: the converter's essay score, and (if measured) the
    score on retrieval prompts at the answer position with its least lazy head,
    and the converter's retrieval calibration per KV head (``head-F``)."""
    mean = scores["mean"]
    task, task_min = scores.get("task_mean"), scores.get("task_min_head")
    per_kv = scores.get("retrieval_kv_head_mean")
    head = "| layer | essay score (converter) |"
    rule = "|---|---|"
    if task:
        head += " retrieval-prompt score | its least lazy head |"
        rule += "---|---|"
    if per_kv:
        head += " retrieval calibration per KV head (convert --calibration retrieval) |"
        rule += "---|"
    lines = ["Layer scores (higher = lazier):", "", head, rule]
    for l, m in enumerate(mean):
        row = f"| {l} | {m:.3f} |"
        if task:
            row += f" {task[l]:.3f} | {task_min[l]:.2f} |"
        if per_kv:
            row += " " + " ".join(f"{x:.2f}" for x in per_kv[l]) + " |"
        lines.append(row)
    return lines + [""]


def summary_markdown(records: Sequence[dict], results: Sequence[Any], settings: dict,
                     scores: dict, seconds: dict, heatmaps: Sequence[str], command: str) -> tuple[str, dict]:
    table = accuracy_table(records)
    tasks, lengths = settings["tasks"], settings["lengths"]
    nlls = {r.variant.name: r.nlls for r in results if r.nlls}
    far_from = settings["sink_tokens"] + settings["window_tokens"]
    ppl = {row["variant"]: row for row in perplexity_rows(nlls, BASELINE, far_from)} if nlls else {}

    cols = [(t, n) for t in tasks for n in lengths]
    saved_at = length_label(max(lengths))
    head = ["variant", "streams", "KV heads streaming", f"KV saved at {saved_at}"]
    head += [f"{t} {length_label(n)}" for t, n in cols]
    head += ["overall", "full right", "kept of those", "Δ vs full", "ppl ratio",
             "ppl ratio beyond window", "run (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    comparisons = {}
    streaming = {r.variant.name: streaming_columns(r.variant, settings) for r in results}
    for r in results:
        name = r.variant.name
        entry = table.get(name, {"cells": {}, "overall": (0, 0)})
        size = streaming[name]
        lazy = [size["streams"], _pct_cell(size["fraction"]), _pct_cell(size["kv_bytes_saved"])]
        cells = [with_interval(entry["cells"].get(c)) for c in cols]
        cmp = comparisons[name] = baseline_comparison(records, name, BASELINE)
        full_right = f"{cmp['baseline_right']}/{cmp['probes']}" if cmp["probes"] else "n/a"
        kept = (with_interval((cmp["kept"], cmp["baseline_right"]))
                if cmp["baseline_right"] else "n/a")
        row = [name, *lazy] + cells + [
            with_interval(entry["overall"]),
            full_right,
            kept,
            "—" if name == BASELINE else _fmt(cmp["delta_points"], "+.1f"),
            _fmt(ppl[name]["ppl_ratio"], ".4f") if name in ppl else "n/a",
            _fmt(ppl[name]["ppl_far_ratio"], ".4f") if name in ppl else "n/a",
            _fmt(r.seconds.get("total"), ".0f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    kinds = sorted({rec.get("kind", "number") for rec in records})
    kind_lines = []
    if len(kinds) > 1:
        kind_lines = ["| variant | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
        for r in results:
            entry = table.get(r.variant.name, {"kinds": {}})
            kind_lines.append(f"| {r.variant.name} | "
                              + " | ".join(with_interval(entry["kinds"].get(k)) for k in kinds)
                              + " |")

    samples = settings["samples"]
    ran = {r.variant.name for r in results}
    skipped = sorted(ran - set(settings["longest_variants"]))
    skip_note = (
        f" Variants {', '.join(skipped)} skip the {length_label(max(lengths))} length "
        "(time budget)." if skipped else ""
    )
    kinds_note = (f" Needle kinds: {', '.join(settings['kinds'])} (sample s hides kind "
                  "s mod 2)." if settings.get("kinds") else "")
    md = [
        "### Retrieval accuracy (%, exact match, greedy, Wilson 95% interval) and perplexity ratio",
        "",
        f"Model `{Path(settings['model']).name}`; sink {settings['sink_tokens']}, window "
        f"{settings['window_tokens']} (real size, not scaled); depths "
        f"{', '.join(f'{d:.0%}' for d in settings['depths'])}; probes per task, length and depth: "
        + ", ".join(f"{length_label(int(k))}: {v}" for k, v in samples.items())
        + "." + kinds_note + skip_note + " `full right`: probes of this variant the unconverted "
        "model answered; `kept of those`: how many of them the variant answered too. "
        "Δ vs full is on the probes each variant ran. `KV heads streaming`: the fraction of "
        "(layer, KV head) pairs on sink + window attention (a lazy layer counts all its KV "
        f"heads); `KV saved at {saved_at}`: KV bytes per {saved_at}-token request saved "
        "against full. Rows with equal numbers there hold the same KV bytes "
        "(score-50 and head-50: per layer vs per KV head).",
        "",
        *lines,
        "",
    ]
    if kind_lines:
        md += ["Accuracy by needle kind (%, Wilson 95% interval):", "", *kind_lines, ""]
    if ppl:
        md += [
            f"Perplexity: {settings['ppl_chunks']} held-out essay chunk(s) of "
            f"{settings['ppl_length']} tokens; \"beyond window\" = token positions >= "
            f"{far_from} (sink + window), the only positions a lazy layer can change.",
            "",
            "| variant | ppl | ratio | ppl beyond window | ratio | ratio within window (sanity: 1) | tokens |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in ppl.items():
            md.append(
                f"| {name} | {row['ppl']:.3f} | {row['ppl_ratio']:.4f} | {row['ppl_far']:.3f} "
                f"| {row['ppl_far_ratio']:.4f} | {row['ppl_near_ratio']:.4f} | {row['tokens']} |"
            )
        md.append("")
    md += ["Lazy layers per variant (per-head variants: `layer:KV heads` of every layer "
           "with a streaming head):", ""]
    for r in results:
        heads = r.variant.streaming_kv_heads
        if heads is not None:
            md.append(f"- {r.variant.name}: "
                      + " ".join(f"{l}:{','.join(map(str, h))}" for l, h in enumerate(heads) if h))
        elif r.variant.lazy_layers is not None:
            md.append(f"- {r.variant.name}: {list(r.variant.lazy_layers)}")
    md += ["", "Targets:", "", *targets(records, ppl, tasks), ""]
    if scores.get("mean"):
        md += layer_score_table(scores)
    md += [
        f"Runtime: {seconds['total'] / 60:.1f} min in all (layer scores "
        f"{seconds.get('layer_scores', 0):.0f} s, {scores.get('from', '')}).",
        "",
        "Heatmaps: " + ", ".join(f"`{h}`" for h in heatmaps),
        "",
        f"Command: `{command}`",
        "",
    ]
    data = {
        "settings": settings,
        "accuracy": {
            name: {
                "overall": entry["overall"],
                "overall_wilson95": wilson_interval(*entry["overall"]),
                "cells": {f"{t}@{n}": v for (t, n), v in entry["cells"].items()},
                "cells_wilson95": {f"{t}@{n}": wilson_interval(*v)
                                   for (t, n), v in entry["cells"].items()},
                "kinds": entry["kinds"],
                "vs_full": comparisons.get(name),
                "delta_vs_full": _same_probe_delta(records, name),
            }
            for name, entry in table.items()
        },
        "perplexity": ppl,
        "variants": {r.variant.name: list(r.variant.lazy_layers or []) for r in results},
        "streaming": {
            r.variant.name: {
                **streaming[r.variant.name],
                "kv_bytes_context_tokens": max(lengths),
                "streaming_kv_heads": (None if r.variant.streaming_kv_heads is None
                                       else [list(h) for h in r.variant.streaming_kv_heads]),
            }
            for r in results
        },
        "seconds": seconds,
        "variant_seconds": {r.variant.name: r.seconds for r in results},
        "layer_scores_mean": scores.get("mean"),
        "retrieval_kv_head_mean": scores.get("retrieval_kv_head_mean"),
    }
    return "\n".join(md), data


def write_outputs(out: Path, results: Sequence[Any], settings: dict, scores: dict,
                  seconds: dict, command: str) -> str:
    out = Path(out)
    records = [rec for r in results for rec in r.records]
    with open(out / "records.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    table = accuracy_table(records)
    heatmaps = write_heatmaps(out, table, [r.variant.name for r in results], settings["tasks"],
                              settings["lengths"], settings["depths"],
                              settings.get("window_tokens")) if records else []
    md, data = summary_markdown(records, results, settings, scores, seconds, heatmaps, command)
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    return md
