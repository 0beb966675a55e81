"""Run the quality probes through vLLM with the plugin, one engine per variant.

What it does
    ``plan_variants`` turns the converter's layer ranking into the variants
    the evaluation compares: the unconverted model, LightTransfer at several
    lazy fractions chosen by score, the same fractions chosen at random and
    as the *least* lazy layers (ablations), streaming attention on every
    layer, and per-KV-head variants (``head-F``: the fraction F of all
    ``(layer, KV head)`` pairs streaming). ``materialize`` writes each as a
    converted folder (config only, weights symlinked; format 2 with
    ``streaming_kv_heads`` for the per-head variants).
    ``run_variant`` serves one folder with ``vllm.LLM`` (the real serving
    path: our plugin's model class, KV manager and attention backend) and
    runs every probe and perplexity chunk of that variant in one
    ``llm.generate`` call.

Runtime on CPU
    Prefill dominates. Probes of one task and length share their filler, so
    with prefix caching each probe after the first recomputes only from its
    needle onwards; prompt-logprob requests never read the prefix cache
    (vLLM recomputes them to return every position's logprob) but cost one
    prefill each. Engines are built one at a time and freed before the next.

Layer scores
    ``layer_scores`` runs the converter's own scoring (``convert.scoring``,
    ``convert.calibration``, same defaults as ``lighttransfer convert``) once
    and caches the per-prompt scores as JSON, or reads them from a
    ``lighttransfer_report.json``.

Per-KV-head scores
    The same function with ``calibration="retrieval"`` runs what
    ``lighttransfer convert --granularity head --calibration retrieval``
    runs (``pipeline.score_source``: the converter's synthetic access-code
    prompts, scored at the answer position) and keeps the per-KV-head scores
    (``[prompts][layers][kv_heads]``); ``head-F`` takes the pairs
    ``select.select_heads`` picks from them at ``--lazy-ratio F``, exactly
    the converter's choice. ``head-essay-F`` does the same from the essay
    scores (the converter's default calibration), which separates "per head
    instead of per layer" from "retrieval-aware calibration".

Same KV bytes
    A lazy layer streams all of its KV heads, so every variant's size is
    ``LightTransferConfig.lazy_fraction``: the fraction of pairs streaming.
    ``score-50`` on 30 layers x 3 KV heads streams 15 layers = 45 pairs,
    ``head-50`` 45 pairs spread over the layers: the same KV bytes
    (``config.kv_bytes_ratio``), different heads. ``num_lazy`` rounds half
    up over layers or pairs, so at 25% the two differ slightly (8 of 30
    layers = 26.7%, 23 of 90 pairs = 25.6%); the report prints both.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vllm_lighttransfer.eval.prompts import Probe
from vllm_lighttransfer.eval.scoring import is_correct, token_nlls
from vllm_lighttransfer.offline import offline_engine

logger = logging.getLogger(__name__)

ENGINE_DEFAULTS: dict[str, Any] = dict(
    enforce_eager=True,
    dtype="bfloat16",
    max_model_len=8192,
    block_size=32,  # the CPU attention backend needs multiples of 32
    enable_prefix_caching=True,
    max_num_batched_tokens=4096,
    seed=0,
    # Logits in float32 for every variant: converted folders ask for it
    # (convert/writer.py, head_dtype), and 16-bit logits tie near-equal
    # tokens, so an unconverted model left at bfloat16 logits would answer
    # differently for a reason unrelated to lazy layers.
    hf_overrides={"head_dtype": "float32"},
)

UNCONVERTED = "full"
STREAM_ALL = "stream-all"


@dataclass(frozen=True)
class Variant:
    name: str  # "full", "score-50", "random-50", "least-50", "stream-all", "head-50"
    # "unconverted" | "score" | "random" | "least" | "task" | "all" | "head" | "head-essay"
    selection: str
    fraction: float  # the fraction asked for (streaming_pairs: the one served)
    lazy_layers: tuple[int, ...] | None  # None: the unconverted model
    # Per layer, the KV heads that stream (format 2); None: whole layers only.
    streaming_kv_heads: tuple[tuple[int, ...], ...] | None = None

    def streaming_pairs(self, num_kv_heads: int) -> int:
        """How many ``(layer, KV head)`` pairs stream (a lazy layer counts all)."""
        whole = len(self.lazy_layers or ()) * num_kv_heads
        return whole + sum(len(h) for h in self.streaming_kv_heads or ())


# ---------------------------------------------------------------- layer scores


def layer_scores(
    src: Path,
    cache: Path | None = None,
    report: Path | None = None,
    progress: bool = True,
    calibration_count: int | None = None,
    calibration: str | None = None,
    sink_tokens: int | None = None,
    window_tokens: int | None = None,
    calibration_length: int | None = None,
    kv_heads: bool = False,
) -> dict[str, Any]:
    """Per-prompt laziness scores of ``src`` (``{"per_prompt": [[...]], ...}``,
    and ``"kv_head_per_prompt": [[[...]]]`` per KV head).

    Reads ``report`` (a converter report) if given, else ``cache`` if it was
    written for the same source and settings, else scores with the
    converter's defaults (``calibration_count`` prompts if given: fewer is
    faster on a big model, and the same as ``convert --calibration-count``)
    and writes ``cache``. ``calibration``: ``None`` for the essays,
    ``"retrieval"`` for the converter's retrieval prompts (its ``n_last``
    then defaults to the answer position, as in ``convert``). ``kv_heads``:
    the per-KV-head scores are needed, so a cache or report without them
    does not count.
    """
    from vllm_lighttransfer.convert import pipeline as P
    from vllm_lighttransfer.convert.retrieval import RETRIEVAL_N_LAST, is_retrieval

    settings = {
        "source": str(Path(src).resolve()),
        "sink_tokens": P.DEFAULT_SINK if sink_tokens is None else sink_tokens,
        "window_tokens": P.DEFAULT_WINDOW if window_tokens is None else window_tokens,
        "n_last": RETRIEVAL_N_LAST if is_retrieval(calibration) else P.DEFAULT_N_LAST,
        "calibration_length": calibration_length or P.DEFAULT_CAL_LENGTH,
        "calibration_count": calibration_count or P.DEFAULT_CAL_COUNT,
    }
    if calibration is not None:  # absent for the essays: caches of earlier runs still match
        settings["calibration"] = str(calibration)
    if report is not None:
        data = json.loads(Path(report).read_text())
        scores = data["scores"]
        if kv_heads and "kv_head_per_prompt" not in scores:
            raise ValueError(f"{report} has no per-KV-head scores (converted before format 2)")
        return {"per_prompt": scores["per_prompt"], "mean": scores.get("mean"),
                "kv_head_per_prompt": scores.get("kv_head_per_prompt"),
                "settings": data.get("settings", {}), "from": str(report)}
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("settings") == settings and (not kv_heads or "kv_head_per_prompt" in data):
            data["from"] = str(cache)
            return data
    # The converter's own calibration and scoring, with its defaults.
    scored = P.score_source(
        Path(src), settings["sink_tokens"], settings["window_tokens"], settings["n_last"],
        calibration, settings["calibration_length"], settings["calibration_count"],
        progress=progress,
    )
    scores = scored.scores
    gc.collect()
    data = {"settings": settings, "calibration_source": scored.calibration_source,
            "per_prompt": scores.per_prompt.tolist(), "mean": scores.mean,
            "kv_head_per_prompt": scores.per_kv_head.tolist(),
            "kv_head_mean": scores.kv_head_mean, "seconds": scores.seconds}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(data, indent=1) + "\n")
    data["from"] = "scored now"
    return data


TASK_CALIBRATION = dict(tasks=("passkey", "needle"), length=4096, depths=(0.25, 0.5), seed=1000)


def task_layer_scores(
    src: Path, tokenizer: Any, cache: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Laziness scores measured on retrieval prompts instead of plain essays.

    Same score as the converter (sink 4, window 1020) but with ``n_last=1``
    on passkey and needle prompts whose last token is the answer's first
    position: the query that must reach back to the needle. The haystacks
    are cut from the converter's calibration text (essay offset 0) with
    other keys, so they share no text with the test probes. A diagnostic
    and a variant (``task-F``), not the converter's default.
    """
    from vllm_lighttransfer.convert.pipeline import DEFAULT_SINK, DEFAULT_WINDOW
    from vllm_lighttransfer.eval.prompts import build_probes

    cal = TASK_CALIBRATION
    settings = {"source": str(Path(src).resolve()), "sink_tokens": DEFAULT_SINK,
                "window_tokens": DEFAULT_WINDOW, "n_last": 1,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in cal.items()}}
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("settings") == settings:
            return data
    from vllm_lighttransfer.convert.scoring import load_model, score_layers

    probes = build_probes(tokenizer, cal["tasks"], {cal["length"]: cal["depths"]},
                          samples=1, seed=cal["seed"], haystack_offset=0)
    model = load_model(str(src))
    scores = score_layers(model, [list(p.token_ids) for p in probes], DEFAULT_SINK,
                          DEFAULT_WINDOW, 1, progress=progress)
    del model
    gc.collect()
    data = {"settings": settings, "per_prompt": scores.per_prompt.tolist(), "mean": scores.mean,
            "min_head": scores.per_head.min(dim=-1).values.min(dim=0).values.tolist(),
            "seconds": scores.seconds}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(data, indent=1) + "\n")
    return data


# ---------------------------------------------------------------- variants


def plan_variants(
    per_prompt: Sequence[Sequence[float]],
    fractions: Sequence[float],
    ablation_fractions: Sequence[float],
    seed: int = 0,
    stream_all: bool = True,
    task_per_prompt: Sequence[Sequence[float]] | None = None,
    task_fractions: Sequence[float] = (),
    head_per_prompt: Sequence[Sequence[Sequence[float]]] | None = None,
    head_fractions: Sequence[float] = (),
    essay_head_per_prompt: Sequence[Sequence[Sequence[float]]] | None = None,
    head_essay_fractions: Sequence[float] = (),
) -> list[Variant]:
    """The variants to compare (see module doc), the unconverted model first.

    By score: the layers ``lighttransfer convert --lazy-ratio f`` picks.
    Least lazy: the ``k`` layers at the bottom of the same ranking. Random:
    ``k`` layers drawn with a seed derived from ``seed`` and ``f``. Per head
    (``head_per_prompt``: retrieval calibration; ``essay_head_per_prompt``:
    the essays; ``[prompts][layers][kv_heads]``): the pairs ``convert
    --granularity head --lazy-ratio f`` picks.
    """
    from vllm_lighttransfer.convert.select import num_lazy, select_by_ratio, select_heads

    num_layers = len(per_prompt[0])
    variants = [Variant(UNCONVERTED, "unconverted", 0.0, None)]
    for f in fractions:
        sel = select_by_ratio(per_prompt, f)
        variants.append(Variant(f"score-{round(100 * f)}", "score", f, sel.lazy_layers))
    for f in ablation_fractions:
        k = num_lazy(num_layers, f)
        sel = select_by_ratio(per_prompt, f)
        rng = random.Random(f"{seed}:random:{f}")
        variants.append(
            Variant(f"random-{round(100 * f)}", "random", f,
                    tuple(sorted(rng.sample(range(num_layers), k))))
        )
        variants.append(
            Variant(f"least-{round(100 * f)}", "least", f, tuple(sorted(sel.ranking[-k:])))
        )
    for f in task_fractions if task_per_prompt is not None else ():
        sel = select_by_ratio(task_per_prompt, f)
        variants.append(Variant(f"task-{round(100 * f)}", "task", f, sel.lazy_layers))
    for prefix, per_prompt_heads, head_fracs in (
        ("head", head_per_prompt, head_fractions),
        ("head-essay", essay_head_per_prompt, head_essay_fractions),
    ):
        for f in head_fracs if per_prompt_heads is not None else ():
            heads = select_heads(per_prompt_heads, "lazy_ratio", f).streaming_kv_heads
            variants.append(Variant(f"{prefix}-{round(100 * f)}", prefix, f, (), heads))
    if stream_all:
        variants.append(Variant(STREAM_ALL, "all", 1.0, tuple(range(num_layers))))
    return variants


def materialize(variant: Variant, src: Path, workdir: Path, sink: int, window: int) -> Path:
    """The folder vLLM serves for ``variant`` (``src`` itself when unconverted)."""
    from vllm_lighttransfer.convert.writer import (
        convert_with_layers,
        converted_config,
        write_converted,
    )

    if variant.lazy_layers is None:
        return Path(src)
    provenance = {"evaluation_variant": variant.name}
    if variant.streaming_kv_heads is None:
        return convert_with_layers(
            src, workdir / variant.name, list(variant.lazy_layers), sink, window, force=True,
            provenance=provenance,
        )
    config = json.loads((Path(src) / "config.json").read_text())
    new = converted_config(
        config, list(variant.lazy_layers), sink, window, provenance,
        streaming_kv_heads=[list(h) for h in variant.streaming_kv_heads],
    )
    return write_converted(src, workdir / variant.name, new, force=True)


# ---------------------------------------------------------------- engine


def engine(folder: Path, **overrides: Any):
    """An in-process ``vllm.LLM`` for ``folder``, shut down and freed on exit."""
    kwargs = dict(ENGINE_DEFAULTS)
    kwargs.update(overrides)
    return offline_engine(folder, **kwargs)


@dataclass
class VariantResult:
    variant: Variant
    records: list[dict] = field(default_factory=list)
    nlls: list[list[float]] = field(default_factory=list)  # per perplexity chunk
    seconds: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "variant": asdict(self.variant),
            "records": self.records,
            "nlls": self.nlls,
            "seconds": self.seconds,
            "prompt_tokens": self.prompt_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "VariantResult":
        v = dict(data["variant"])
        if v["lazy_layers"] is not None:
            v["lazy_layers"] = tuple(v["lazy_layers"])
        if v.get("streaming_kv_heads") is not None:
            v["streaming_kv_heads"] = tuple(tuple(h) for h in v["streaming_kv_heads"])
        return cls(Variant(**v), data["records"], data["nlls"], data["seconds"],
                   data.get("prompt_tokens", 0))


def probe_order(probes: Sequence[Probe]) -> list[Probe]:
    """Deepest needle first within each task and length: a probe then finds
    the filler before its needle already cached by the one before it."""
    return sorted(probes, key=lambda p: (p.task, p.length, -p.depth, p.sample))


def run_variant(
    llm: Any,
    variant: Variant,
    probes: Sequence[Probe],
    ppl_chunks: Sequence[Sequence[int]] = (),
    max_tokens: int = 16,
    use_tqdm: bool = True,
) -> VariantResult:
    """Greedy answers for ``probes`` and token NLLs for ``ppl_chunks``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    probes = probe_order(probes)
    answer = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    score = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompts = [TokensPrompt(prompt_token_ids=list(p.token_ids)) for p in probes]
    prompts += [TokensPrompt(prompt_token_ids=list(c)) for c in ppl_chunks]
    params = [answer] * len(probes) + [score] * len(ppl_chunks)
    result = VariantResult(variant)
    result.prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm) if prompts else []
    result.seconds["generate"] = time.perf_counter() - t0
    for probe, out in zip(probes, outputs[: len(probes)]):
        text = out.outputs[0].text
        result.records.append(
            {
                "variant": variant.name,
                "task": probe.task,
                "length": probe.length,
                "depth": probe.depth,
                "actual_depth": round(probe.actual_depth, 4),
                "sample": probe.sample,
                "kind": probe.kind,
                "answer": probe.answer,
                "output": text,
                "correct": is_correct(text, probe.answer, probe.kind),
                "cached_tokens": getattr(out, "num_cached_tokens", None),
            }
        )
    for chunk, out in zip(ppl_chunks, outputs[len(probes) :]):
        result.nlls.append(token_nlls(out.prompt_logprobs, chunk))
    return result
