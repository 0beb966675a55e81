"""What a conversion decided and why: ``lighttransfer_report.json`` and a plot.

What it does
    ``build_report`` gathers the source, the settings, the per-layer scores,
    the selection and the timings into one JSON-ready dict;
    ``provenance`` is the compact part of it that goes into the
    ``lighttransfer`` section of config.json; ``plot_scores`` draws the
    per-layer scores with the chosen layers marked and, for a per-KV-head
    conversion, a layer x KV-head heatmap of the scores with the streaming
    heads marked; it returns PNG bytes (matplotlib, Agg backend: no display
    needed). Imports no vLLM.

Per KV head
    Every scored report carries ``scores.kv_head_mean`` (``[layers][kv_heads]``)
    and ``scores.kv_head_per_prompt``, whatever the granularity, so a layer
    conversion already shows what a head conversion would see. A head
    conversion adds ``streaming_kv_heads`` (per layer, the chosen heads),
    ``scores.kv_head_lazy_frequency`` and ``selection.ranking`` as
    ``[layer, kv_head]`` pairs; its ``lazy_layers`` is empty.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Mapping, Sequence

from vllm_lighttransfer import __version__
from vllm_lighttransfer.config import LightTransferConfig, kv_bytes_ratio

logger = logging.getLogger(__name__)

REPORT_FILE = "lighttransfer_report.json"
PLOT_FILE = "lighttransfer_scores.png"


def _round(values: Sequence[float], digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in values]


def build_report(
    *,
    source: Mapping[str, Any],
    config: Mapping[str, Any],
    method: str,
    settings: Mapping[str, Any],
    scores: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
    timings: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The report of a conversion (``config`` is the converted config.json).

    ``scores``: ``mean``, ``std``, ``per_prompt`` (``[prompts][layers]``),
    ``per_head_mean`` (``[layers][heads]``, query heads), ``kv_head_mean``
    (``[layers][kv_heads]``), ``kv_head_per_prompt``, and ``lazy_frequency``
    (per layer) or ``kv_head_lazy_frequency`` (per KV head) by granularity.
    """
    cfg = LightTransferConfig.from_hf_config(config)
    context = int(config.get("max_position_embeddings") or 0)
    report: dict[str, Any] = {
        "converter": f"vllm-lighttransfer {__version__}",
        "source": dict(source),
        "architecture": config["architectures"][0],
        "base_architecture": cfg.base_architecture,
        "num_hidden_layers": cfg.num_hidden_layers,
        "method": method,
        "lazy_layers": list(cfg.lazy_layers),
        "num_lazy_layers": len(cfg.lazy_layers),
        "sink_tokens": cfg.sink_tokens,
        "window_tokens": cfg.window_tokens,
        "settings": dict(settings),
    }
    if cfg.streaming_kv_heads is not None:
        report["streaming_kv_heads"] = [list(cfg.streaming_heads(l))
                                        for l in range(cfg.num_hidden_layers)]
        report["num_streaming_kv_heads"] = sum(map(len, report["streaming_kv_heads"]))
        report["num_kv_heads"] = cfg.num_kv_heads
        report["lazy_fraction"] = round(cfg.lazy_fraction, 6)
    if context > cfg.sink_tokens + cfg.window_tokens:
        # KV bytes per request at the full context, converted / unconverted.
        report["kv_memory_ratio"] = {
            "context_tokens": context,
            "per_token": round(kv_bytes_ratio(cfg, context), 4),
            "block_size_32": round(kv_bytes_ratio(cfg, context, 32), 4),
        }
    if selection is not None:
        report["selection"] = dict(selection)
    if scores is not None:
        report["scores"] = {
            "definition": (
                "mean over heads and the last n_last queries of the causal attention "
                "mass on keys [0, sink_tokens) U [L - window_tokens, L), L = prompt "
                "length; higher = lazier. kv_head_*: the same over the query heads "
                "of one KV head"
            ),
            "mean": _round(scores["mean"]),
            "std": _round(scores["std"]),
            "per_prompt": [_round(row) for row in scores["per_prompt"]],
            "per_head_mean": [_round(row) for row in scores["per_head_mean"]],
            "kv_head_mean": [_round(row) for row in scores["kv_head_mean"]],
            "kv_head_per_prompt": [
                [_round(row) for row in prompt] for prompt in scores["kv_head_per_prompt"]
            ],
        }
        for key in ("lazy_frequency", "kv_head_lazy_frequency"):
            if key in scores:
                value = scores[key]
                report["scores"][key] = (
                    [_round(row, 4) for row in value] if key.startswith("kv_") else _round(value, 4)
                )
    if timings:
        report["timings_s"] = {k: round(float(v), 2) for k, v in timings.items()}
    return report


def provenance(report: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the report recorded in config.json's ``lighttransfer`` section."""
    out: dict[str, Any] = {
        "converter": report["converter"],
        "method": report["method"],
        "source": report["source"],
        "settings": report["settings"],
    }
    if "selection" in report:
        # The chosen layers or heads are the section's own keys; a per-head
        # ranking (layers x KV heads pairs) stays in the report.
        per_head = "streaming_kv_heads" in report["selection"]
        out["selection"] = {
            k: v
            for k, v in report["selection"].items()
            if k not in ("lazy_layers", "streaming_kv_heads") and not (per_head and k == "ranking")
        }
    if "scores" in report:
        out["scores"] = report["scores"]["mean"]
        if "lazy_frequency" in report["scores"]:
            out["lazy_frequency"] = report["scores"]["lazy_frequency"]
    return out


def plot_scores(
    mean: Sequence[float],
    std: Sequence[float],
    frequency: Sequence[float] | None,
    lazy_layers: Sequence[int],
    title: str,
    threshold: float | None = None,
    kv_head_scores: Sequence[Sequence[float]] | None = None,
    streaming_kv_heads: Sequence[Sequence[int]] | None = None,
) -> bytes:
    """Bar chart of per-layer scores, lazy layers highlighted; returns PNG bytes.

    With ``kv_head_scores`` (``[layers][kv_heads]``) and ``streaming_kv_heads``
    (per layer, the chosen heads) a layer x KV-head heatmap is drawn below,
    the streaming heads outlined, and the bars are colored by how many of a
    layer's heads stream (``lazy_layers`` is then ignored). ``frequency``
    (per layer, dots) may be None.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    layers = list(range(len(mean)))
    per_head = kv_head_scores is not None and streaming_kv_heads is not None
    width = max(6.0, 0.28 * len(layers) + 2)
    if per_head:
        num_kv = len(kv_head_scores[0])
        heat_height = min(6.0, 1.2 + 0.25 * num_kv)
        # Constrained layout: the colorbar takes its width from both axes,
        # so the heatmap's layers stay under the bars.
        fig = Figure(figsize=(width, 4.2 + heat_height), dpi=120, layout="constrained")
        ax, heat = fig.subplots(2, 1, height_ratios=[4.2, heat_height])
        counts = [len(streaming_kv_heads[l]) for l in layers]
        kinds = ["all" if c == num_kv else "some" if c else "none" for c in counts]
    else:
        fig = Figure(figsize=(width, 4.2), dpi=120)
        ax = fig.add_subplot()
        lazy = set(lazy_layers)
        kinds = ["all" if l in lazy else "none" for l in layers]
    palette = {"all": "#d95f02", "some": "#e6ab02", "none": "#7570b3"}
    ax.bar(layers, mean, yerr=std, color=[palette[k] for k in kinds], edgecolor="black",
           linewidth=0.4, error_kw={"elinewidth": 0.6, "capsize": 1.5})
    if frequency is not None:
        ax.plot(layers, frequency, linestyle="none", marker="o", markersize=3.5,
                color="black", label="lazy frequency")
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlim(-0.7, len(layers) - 0.3)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass on sink + window")
    step = 1 if len(layers) <= 32 else 2 if len(layers) <= 64 else 4
    ax.set_xticks(layers[::step])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=9)
    n = {k: kinds.count(k) for k in palette}
    if per_head:
        handles = [
            Patch(color=palette["all"], label=f"every KV head streaming ({n['all']})"),
            Patch(color=palette["some"], label=f"some KV heads streaming ({n['some']})"),
            Patch(color=palette["none"], label=f"full attention ({n['none']})"),
        ]
    else:
        handles = [
            Patch(color=palette["all"], label=f"lazy: streaming ({n['all']})"),
            Patch(color=palette["none"], label=f"full attention ({n['none']})"),
        ]
    if frequency is not None:
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=3.5,
                              color="black", label="lazy frequency over prompts"))
    if threshold is not None:
        handles.append(Line2D([], [], color="gray", linestyle="--", label=f"threshold {threshold}"))
    ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.9)
    ax.grid(axis="y", linewidth=0.3)
    if per_head:
        # [kv_heads, layers]: layers along x, under the bars.
        grid = [[kv_head_scores[l][h] for l in layers] for h in range(num_kv)]
        image = heat.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0,
                            vmax=1.0, extent=(-0.5, len(layers) - 0.5, -0.5, num_kv - 0.5))
        chosen = [(l, h) for l in layers for h in streaming_kv_heads[l]]
        if chosen:
            heat.scatter([l for l, _ in chosen], [h for _, h in chosen], marker="s", s=40,
                         facecolors="none", edgecolors="#d95f02", linewidths=1.2)
        heat.set_xlim(-0.7, len(layers) - 0.3)
        heat.set_xticks(layers[::step])
        heat.set_yticks(range(num_kv)[:: 1 if num_kv <= 16 else 2])
        heat.tick_params(labelsize=7)
        heat.set_xlabel("layer")
        heat.set_ylabel("KV head")
        heat.set_title(f"per KV head; outlined: streaming ({len(chosen)} of "
                       f"{num_kv * len(layers)})", fontsize=8)
        fig.colorbar(image, ax=[ax, heat], fraction=0.03, pad=0.01).ax.tick_params(labelsize=7)
    else:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
