"""Quality-targeted conversion: the largest lazy ratio whose measured loss fits a budget.

What it does
    ``lighttransfer convert SRC OUT --max-loss POINTS`` scores the layers as
    usual, then for each lazy ratio of ``SearchSettings.ratios`` (the layers
    ``--lazy-ratio R`` would pick) measures, against the unconverted model:

    * retrieval: built-in passkey and needle probes (``eval.prompts``), a
      5-digit number or a word hidden at depths inside and beyond the window,
      seeded and cut from other essay text than the quality tool's probes
      (``SEARCH_SEED``, ``SEARCH_HAYSTACK_OFFSET``);
    * perplexity of a held-out essay chunk (``SEARCH_PPL_OFFSET``) over the
      positions ``>= sink + window``, the only ones a lazy layer changes;
    * KV bytes saved per request at the model's full context
      (``config.kv_bytes_ratio``).

    ``loss = max(retrieval drop in points, perplexity increase in percent)``;
    ``choose_ratio`` keeps the largest ratio such that it and every smaller
    ratio stay within ``max_loss`` (a non-monotone curve never lets a lucky
    large ratio pass after a smaller one failed). If even the smallest ratio
    fails, no layer is made lazy and the report says so. The whole curve goes
    into ``lighttransfer_report.json`` (``quality_search``) and
    ``lighttransfer_search.png``, so the trade-off is visible before serving.

How it measures (fast: transformers, not vLLM)
    The model runs in transformers with the reference attention
    (``reference.ReferenceHybridModel``: the sink+window mask on the lazy
    layers, plain causal elsewhere, float32 softmax), one forward per probe
    and ratio, the weights loaded once. A probe is answered right when
    greedy decoding would produce the key: teacher-forced on
    ``prompt + " " + key``, the argmax at every answer position is the key's
    token and the prediction after it does not continue the key (no extra
    digit or letter). That is exact-match greedy decoding without the
    decode loop.

Cost
    (1 + len(ratios)) x (probes + 1) forwards of ``length`` tokens; the
    defaults are 4 points x 9 forwards of 2048 tokens. SmolLM2-135M on one
    CPU core: a few minutes. Dense masks: memory grows with ``length^2``
    per layer (heads x length^2 x 4 bytes), so keep ``length`` a few
    thousand tokens on CPU.

Granularity
    8 probes by default: one probe is 12.5 points, so ``--max-loss`` below
    12.5 allows no lost probe. The report gives each retrieval rate with its
    Wilson 95% interval; use it to judge how much the choice can be trusted.
"""

from __future__ import annotations

import io
import logging
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from vllm_lighttransfer.config import LightTransferConfig, LightTransferConfigError, kv_bytes_ratio

logger = logging.getLogger("vllm_lighttransfer")

PLOT_FILE = "lighttransfer_search.png"
DEFAULT_RATIOS = (0.25, 0.5, 0.75)
SEARCH_SEED = 7919
# Joined-essay token offsets: calibration reads [0, 24.6K), the quality
# tool's haystacks [40K, 48K) and its perplexity text [100K, 107K).
SEARCH_HAYSTACK_OFFSET = 60_000
SEARCH_PPL_OFFSET = 125_000
_HEAD_CHUNK = 256  # positions per LM-head matmul (vocab x 256 floats at a time)


# ---------------------------------------------------------------- settings


def parse_max_loss(text: str | float) -> float:
    """``--max-loss`` as points in [0, 100] (one-line error otherwise)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 100.0:
        raise LightTransferConfigError(
            f"--max-loss={text}: expected points in [0, 100] (retrieval points and "
            "perplexity percent the conversion may lose)"
        )
    return value


def parse_ratios(text: str | Sequence[float]) -> tuple[float, ...]:
    """``--search-ratios`` as sorted unique values in (0, 1]."""
    try:
        values = (
            [float(t) for t in text.split(",") if t.strip()] if isinstance(text, str)
            else [float(v) for v in text]
        )
    except ValueError:
        values = []
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise LightTransferConfigError(
            f"--search-ratios={text}: expected comma-separated lazy ratios in (0, 1], e.g. 0.25,0.5,0.75"
        )
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class SearchSettings:
    max_loss: float
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    length: int | None = None  # None: sink + window + 1024
    tasks: tuple[str, ...] = ("passkey", "needle")
    depths: tuple[float, ...] = (0.2, 0.8)
    samples: int = 2  # per (task, depth): one number, one word
    ppl_chunks: int = 1

    def probe_length(self, sink_tokens: int, window_tokens: int) -> int:
        return self.length if self.length is not None else sink_tokens + window_tokens + 1024

    def check(self, sink_tokens: int, window_tokens: int, max_position: int | None) -> None:
        length = self.probe_length(sink_tokens, window_tokens)
        if length <= sink_tokens + window_tokens:
            raise LightTransferConfigError(
                f"--search-length={length}: must exceed --sink-tokens + --window-tokens = "
                f"{sink_tokens + window_tokens}, or no lazy layer changes anything"
            )
        if max_position is not None and length + 8 > max_position:
            raise LightTransferConfigError(
                f"--search-length={length}: the probes and their answers must fit the "
                f"model's max_position_embeddings {max_position}"
            )


# ---------------------------------------------------------------- curve


@dataclass
class CurvePoint:
    """One lazy ratio measured against the unconverted model."""

    ratio: float  # 0.0: the unconverted model
    lazy_layers: list[int]
    retrieval_right: int
    retrieval_total: int
    ppl: float  # perplexity beyond sink + window
    kv_bytes_saved: float  # fraction of per-request KV bytes at the full context
    retrieval_loss: float = 0.0  # points below the unconverted model (>= 0)
    ppl_increase: float = 0.0  # percent above the unconverted model (>= 0)
    loss: float = 0.0
    within_budget: bool = True
    seconds: float = 0.0
    answers: list[dict] = field(default_factory=list)

    @property
    def retrieval(self) -> float:
        return 100.0 * self.retrieval_right / self.retrieval_total if self.retrieval_total else 0.0


def apply_budget(points: list[CurvePoint], max_loss: float) -> None:
    """Fill in each point's losses against ``points[0]`` (the unconverted model)."""
    base = points[0]
    for p in points:
        p.retrieval_loss = max(0.0, base.retrieval - p.retrieval)
        p.ppl_increase = max(0.0, 100.0 * (p.ppl / base.ppl - 1.0)) if base.ppl > 0 else 0.0
        p.loss = max(p.retrieval_loss, p.ppl_increase)
        p.within_budget = p.loss <= max_loss + 1e-9


def choose_ratio(points: Sequence[CurvePoint], max_loss: float) -> CurvePoint | None:
    """The largest ratio that, with every smaller one, stays within ``max_loss``.

    ``points`` hold the unconverted model (ratio 0) and the measured ratios;
    losses are recomputed here. None: even the smallest ratio loses too much.
    """
    pts = sorted(points, key=lambda p: p.ratio)
    apply_budget(pts, max_loss)
    chosen = None
    for p in pts[1:]:
        if not p.within_budget:
            break
        chosen = p
    return chosen


# ---------------------------------------------------------------- measuring


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


class _Evaluator:
    """Forwards of one model under several lazy-layer sets (weights loaded once)."""

    def __init__(self, model: Any, tokenizer: Any):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self._continues: dict[tuple[int, str], bool] = {}

    def hidden(self, ids: Sequence[int]):
        torch = self.torch
        with torch.no_grad():
            out = self.decoder(input_ids=torch.tensor([list(ids)]), use_cache=False)
        return out.last_hidden_state[0]  # [L, D]

    def logits_at(self, hidden, positions: Sequence[int]):
        with self.torch.no_grad():
            return self.head(hidden[list(positions)]).float()  # [P, V]

    def continues_key(self, token: int, kind: str) -> bool:
        """Whether ``token`` would extend the key (a digit after a number, a letter after a word)."""
        key = (token, kind)
        if key not in self._continues:
            text = self.tokenizer.decode([token])
            first = text[:1]
            self._continues[key] = first.isdigit() if kind == "number" else first.isalpha()
        return self._continues[key]

    def answered(self, probe: Any) -> dict:
        answer_ids = list(self.tokenizer(" " + probe.answer, add_special_tokens=False)["input_ids"])
        ids = list(probe.token_ids) + answer_ids
        h = self.hidden(ids)
        start = len(probe.token_ids) - 1
        pred = self.logits_at(h, range(start, start + len(answer_ids) + 1)).argmax(-1).tolist()
        right = pred[:-1] == answer_ids and not self.continues_key(pred[-1], probe.kind)
        return {"task": probe.task, "depth": probe.depth, "kind": probe.kind,
                "sample": probe.sample, "answer": probe.answer, "correct": right,
                "first_token_right": pred[0] == answer_ids[0]}

    def nll_beyond(self, ids: Sequence[int], far_from: int) -> list[float]:
        """NLL of tokens at positions ``>= far_from``."""
        torch = self.torch
        h = self.hidden(ids)
        targets = torch.tensor(list(ids))
        out: list[float] = []
        for lo in range(far_from - 1, len(ids) - 1, _HEAD_CHUNK):
            hi = min(lo + _HEAD_CHUNK, len(ids) - 1)
            logp = self.logits_at(h, range(lo, hi)).log_softmax(-1)
            out += (-logp.gather(1, targets[lo + 1 : hi + 1, None])[:, 0]).tolist()
        return out


def measure_curve(
    model: Any,
    tokenizer: Any,
    per_prompt: Sequence[Sequence[float]],
    base_architecture: str,
    sink_tokens: int,
    window_tokens: int,
    context_tokens: int,
    settings: SearchSettings,
    essays: Sequence[int] | None = None,
    progress: bool = True,
) -> list[CurvePoint]:
    """The unconverted model and every ratio of ``settings.ratios`` (see module doc)."""
    from tqdm.auto import tqdm

    from vllm_lighttransfer.convert.select import select_by_ratio
    from vllm_lighttransfer.eval import prompts as P
    from vllm_lighttransfer.eval.scoring import perplexity
    from vllm_lighttransfer.reference import ReferenceHybridModel

    num_layers = len(per_prompt[0])
    length = settings.probe_length(sink_tokens, window_tokens)
    if essays is None:
        essays = P.essay_ids(tokenizer)
    probes = P.build_probes(
        tokenizer, settings.tasks, {length: settings.depths}, settings.samples, SEARCH_SEED,
        essays, haystack_offset=SEARCH_HAYSTACK_OFFSET, kinds=P.KINDS,
    )
    text = P.held_out(essays, SEARCH_PPL_OFFSET, length * settings.ppl_chunks)
    chunks = [text[i * length : (i + 1) * length] for i in range(settings.ppl_chunks)]
    far_from = sink_tokens + window_tokens

    plan: list[tuple[float, list[int] | None]] = [(0.0, None)]
    plan += [(r, list(select_by_ratio(per_prompt, r).lazy_layers)) for r in settings.ratios]
    evaluator = _Evaluator(model, tokenizer)
    points = []
    bar = tqdm(total=len(plan) * (len(probes) + len(chunks)), desc="Quality search",
               unit="forward", disable=not progress)
    try:
        for ratio, layers in plan:
            cfg = None
            if layers is not None:
                cfg = LightTransferConfig(tuple(layers), sink_tokens, window_tokens,
                                          base_architecture, num_layers)
            ReferenceHybridModel(model, cfg)  # installs this layer set's attention
            bar.set_postfix(ratio=ratio)
            t0 = time.perf_counter()
            answers = []
            for probe in probes:
                answers.append(evaluator.answered(probe))
                bar.update(1)
            nlls = []
            for chunk in chunks:
                nlls += evaluator.nll_beyond(chunk, far_from)
                bar.update(1)
            saved = 0.0
            if cfg is not None and context_tokens > far_from:
                saved = 1.0 - kv_bytes_ratio(cfg, context_tokens)
            points.append(CurvePoint(
                ratio=ratio, lazy_layers=layers or [],
                retrieval_right=sum(a["correct"] for a in answers),
                retrieval_total=len(answers), ppl=perplexity(nlls), kv_bytes_saved=saved,
                seconds=time.perf_counter() - t0, answers=answers,
            ))
            logger.info("lazy ratio %.3f: retrieval %d/%d, perplexity %.3f (%.1f s)", ratio,
                        points[-1].retrieval_right, len(answers), points[-1].ppl,
                        points[-1].seconds)
    finally:
        bar.close()
    return points


# ---------------------------------------------------------------- report


def search_report(
    points: Sequence[CurvePoint],
    chosen: CurvePoint | None,
    settings: SearchSettings,
    sink_tokens: int,
    window_tokens: int,
    context_tokens: int,
    seconds: float,
    peak_rss_mib: float | None = None,
) -> dict[str, Any]:
    """The ``quality_search`` part of ``lighttransfer_report.json``."""
    from vllm_lighttransfer.eval.scoring import wilson_interval

    curve = []
    for p in sorted(points, key=lambda p: p.ratio):
        lo, hi = wilson_interval(p.retrieval_right, p.retrieval_total)
        row = asdict(p)
        row.update(
            retrieval=round(p.retrieval, 2),
            retrieval_wilson95=[round(100 * lo, 2), round(100 * hi, 2)],
            ppl=round(p.ppl, 4),
            retrieval_loss=round(p.retrieval_loss, 2),
            ppl_increase=round(p.ppl_increase, 3),
            loss=round(p.loss, 3),
            kv_bytes_saved=round(p.kv_bytes_saved, 4),
            seconds=round(p.seconds, 2),
        )
        curve.append(row)
    return {
        "max_loss": settings.max_loss,
        "loss_definition": (
            "max(retrieval drop vs the unconverted model in points, perplexity increase "
            "beyond sink + window in percent); the chosen ratio and every smaller one "
            "stay within max_loss"
        ),
        "chosen_ratio": chosen.ratio if chosen else None,
        "chosen_lazy_layers": list(chosen.lazy_layers) if chosen else [],
        "probes": {
            "tasks": list(settings.tasks), "depths": list(settings.depths),
            "samples_per_depth": settings.samples, "kinds": ["number", "word"],
            "length": settings.probe_length(sink_tokens, window_tokens),
            "seed": SEARCH_SEED, "haystack_offset": SEARCH_HAYSTACK_OFFSET,
            "perplexity_chunks": settings.ppl_chunks, "perplexity_offset": SEARCH_PPL_OFFSET,
            "perplexity_from_position": sink_tokens + window_tokens,
        },
        "kv_context_tokens": context_tokens,
        "curve": curve,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_rss_mib, 1) if peak_rss_mib is not None else None,
        "attention": "reference (transformers, float32 softmax, dense sink+window mask)",
    }


def plot_search(report: dict[str, Any], title: str) -> bytes:
    """Three panels against the lazy ratio: retrieval (with Wilson 95%
    intervals), perplexity increase, KV bytes saved; the chosen ratio marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    curve = report["curve"]
    x = [100 * c["ratio"] for c in curve]
    fig = Figure(figsize=(11, 3.6), dpi=110)
    axes = fig.subplots(1, 3)
    ret = [c["retrieval"] for c in curve]
    err = [[r - c["retrieval_wilson95"][0] for r, c in zip(ret, curve)],
           [c["retrieval_wilson95"][1] - r for r, c in zip(ret, curve)]]
    axes[0].errorbar(x, ret, yerr=err, marker="o", capsize=3, color="#1b9e77")
    axes[0].axhline(ret[0] - report["max_loss"], color="gray", linestyle="--", linewidth=0.8,
                    label=f"budget: full - {report['max_loss']:g} points")
    axes[0].set_ylim(-3, 103)
    axes[0].set_ylabel("retrieval (%, Wilson 95%)")
    axes[1].plot(x, [c["ppl_increase"] for c in curve], marker="o", color="#d95f02")
    axes[1].axhline(report["max_loss"], color="gray", linestyle="--", linewidth=0.8,
                    label=f"budget: +{report['max_loss']:g}%")
    axes[1].set_ylabel("perplexity increase beyond window (%)")
    axes[2].plot(x, [100 * c["kv_bytes_saved"] for c in curve], marker="o", color="#7570b3")
    axes[2].set_ylabel(f"KV bytes saved at {report['kv_context_tokens']} tokens (%)")
    for ax in axes:
        ax.set_xlabel("lazy layers (%)")
        ax.grid(linewidth=0.3)
        if report["chosen_ratio"] is not None:
            ax.axvline(100 * report["chosen_ratio"], color="black", linewidth=1.0,
                       label=f"chosen: {100 * report['chosen_ratio']:g}%")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if report["chosen_ratio"] is None:
        title += "\nno ratio fits the budget: no layer is lazy"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run_search(
    model: Any,
    tokenizer: Any,
    per_prompt: Sequence[Sequence[float]],
    base_architecture: str,
    sink_tokens: int,
    window_tokens: int,
    context_tokens: int,
    settings: SearchSettings,
    progress: bool = True,
) -> tuple[CurvePoint | None, dict[str, Any]]:
    """Measure the curve and choose; returns the chosen point and the report part."""
    t0 = time.perf_counter()
    points = measure_curve(model, tokenizer, per_prompt, base_architecture, sink_tokens,
                           window_tokens, context_tokens, settings, progress=progress)
    chosen = choose_ratio(points, settings.max_loss)
    report = search_report(points, chosen, settings, sink_tokens, window_tokens, context_tokens,
                           time.perf_counter() - t0, _peak_rss_mib())
    if chosen is None:
        logger.warning(
            "no lazy ratio keeps the loss within --max-loss %g (the smallest, %g, loses %.1f): "
            "no layer is made lazy; see the curve in the report", settings.max_loss,
            points[1].ratio if len(points) > 1 else float("nan"),
            points[1].loss if len(points) > 1 else float("nan"),
        )
    else:
        logger.info("max-loss %g: lazy ratio %g (%d layers), loss %.1f", settings.max_loss,
                    chosen.ratio, len(chosen.lazy_layers), chosen.loss)
    return chosen, report
