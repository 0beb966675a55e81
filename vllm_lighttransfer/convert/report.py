"""What a conversion decided and why: ``lighttransfer_report.json`` and a plot.

What it does
    ``build_report`` gathers the source, the settings, the per-layer scores,
    the selection and the timings into one JSON-ready dict;
    ``provenance`` is the compact part of it that goes into the
    ``lighttransfer`` section of config.json; ``plot_scores`` draws the
    per-layer scores with the chosen layers marked and returns PNG bytes
    (matplotlib, Agg backend: no display needed). Imports no vLLM.
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

    ``scores``: ``mean``, ``std``, ``lazy_frequency``, ``per_prompt``
    (``[prompts][layers]``), ``per_head_mean`` (``[layers][heads]``).
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
                "length; higher = lazier"
            ),
            "mean": _round(scores["mean"]),
            "std": _round(scores["std"]),
            "lazy_frequency": _round(scores["lazy_frequency"], 4),
            "per_prompt": [_round(row) for row in scores["per_prompt"]],
            "per_head_mean": [_round(row) for row in scores["per_head_mean"]],
        }
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
        out["selection"] = {
            k: v for k, v in report["selection"].items() if k != "lazy_layers"
        }
    if "scores" in report:
        out["scores"] = report["scores"]["mean"]
        out["lazy_frequency"] = report["scores"]["lazy_frequency"]
    return out


def plot_scores(
    mean: Sequence[float],
    std: Sequence[float],
    frequency: Sequence[float],
    lazy_layers: Sequence[int],
    title: str,
    threshold: float | None = None,
) -> bytes:
    """Bar chart of per-layer scores, lazy layers highlighted; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    lazy = set(lazy_layers)
    layers = list(range(len(mean)))
    colors = ["#d95f02" if l in lazy else "#7570b3" for l in layers]
    fig = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2), 4.2), dpi=120)
    ax = fig.add_subplot()
    ax.bar(layers, mean, yerr=std, color=colors, edgecolor="black", linewidth=0.4,
           error_kw={"elinewidth": 0.6, "capsize": 1.5})
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
    handles = [
        Patch(color="#d95f02", label=f"lazy: streaming ({len(lazy)})"),
        Patch(color="#7570b3", label=f"full attention ({len(layers) - len(lazy)})"),
        Line2D([], [], linestyle="none", marker="o", markersize=3.5, color="black",
               label="lazy frequency over prompts"),
    ]
    if threshold is not None:
        handles.append(Line2D([], [], color="gray", linestyle="--", label=f"threshold {threshold}"))
    ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.9)
    ax.grid(axis="y", linewidth=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
