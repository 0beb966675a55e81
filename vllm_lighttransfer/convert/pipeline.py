"""The conversion pipeline: one entry point for the CLI, the quality tool and the search.

What it does
    ``convert(options)`` turns a model (a Hugging Face folder or a ``.gguf``
    file) into a converted folder and returns what it decided
    (``ConvertResult``). ``lighttransfer convert`` is a thin shell around it.
    ``score_source(hf_dir, ...)`` is the calibration + scoring step on its
    own: the quality tool ranks layers with it, so its variants are exactly
    the layers ``convert`` would pick. ``open_source(src, scratch)`` yields a
    plain HF folder for either kind of source. Imports no vLLM.

Flow
    check options -> check OUT -> resolve SRC (dequantize a GGUF into a
    scratch folder beside OUT) -> check the model -> layers (preset |
    explicit list | calibration + scoring + selection by ratio or threshold,
    or by measured quality with ``max_loss``: ``convert/search.py``), or with
    ``granularity="head"`` streaming KV heads (scoring + selection per
    ``(layer, KV head)`` pair, written as format-2 ``streaming_kv_heads``) ->
    report -> write OUT atomically. Cheap checks come first, so a bad option fails in
    milliseconds, not after a model loads. Every expected failure raises
    ``LightTransferConfigError`` with a one-line message naming the flag or
    path; nothing is left in OUT.

Options
    ``ConvertOptions`` mirrors the command line one to one (``lazy_ratio``
    is ``--lazy-ratio``, ...), so a message about ``--window-tokens`` means
    the ``window_tokens`` field here too. ``calibration="retrieval"`` is the
    built-in retrieval prompts (``convert/retrieval.py``); its ``n_last``
    defaults to ``RETRIEVAL_N_LAST`` (the answer position), the text
    calibration's to ``DEFAULT_N_LAST``.

Defaults
    Without flags: ``granularity="head"`` (streaming KV heads, half of the
    (layer, KV head) pairs) scored on the retrieval calibration. ``--layers``,
    ``--preset`` and ``--max-loss`` choose whole layers and so imply
    ``granularity="layer"``, whose default calibration is the essays (the
    paper's LightTransfer); ``--granularity layer`` asks for that with a
    ratio or threshold too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from vllm_lighttransfer.config import ARCHITECTURES, SECTION, LightTransferConfigError

logger = logging.getLogger("vllm_lighttransfer")

DEFAULT_SINK = 4
DEFAULT_WINDOW = 1020
DEFAULT_N_LAST = 32
DEFAULT_LAZY_RATIO = 0.5
DEFAULT_CAL_LENGTH = 4096
DEFAULT_CAL_COUNT = 6
GRANULARITIES = ("layer", "head")
# Per KV head by the retrieval calibration keeps retrieval better than whole
# layers at the same KV bytes (bench/QUALITY.md, "Per KV head vs per layer"),
# so it is what a plain ``lighttransfer convert SRC OUT`` writes. The flags
# that choose whole layers (--layers, --preset, --max-loss) imply "layer".
DEFAULT_GRANULARITY = "head"
LAYER_FLAGS = ("--layers", "--preset", "--max-loss")


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` needs; ``None`` means "the default" (see ``check_options``)."""

    src: str | Path
    out: str | Path
    lazy_ratio: float | None = None
    threshold: float | None = None
    layers: str | None = None
    preset: str | None = None
    sink_tokens: int | None = None
    window_tokens: int | None = None
    n_last: int | None = None
    calibration: str | Path | None = None
    calibration_length: int = DEFAULT_CAL_LENGTH
    calibration_count: int = DEFAULT_CAL_COUNT
    device: str = "cpu"
    dtype: str = "float32"
    copy: bool = False
    force: bool = False
    progress: bool = True
    # Quality-targeted selection (convert/search.py): the largest ratio of
    # search_ratios whose measured loss stays within max_loss points.
    max_loss: float | None = None
    search_ratios: tuple[float, ...] | None = None
    search_length: int | None = None
    # "layer": lazy_layers; "head": streaming_kv_heads (lazy_ratio and
    # threshold then count (layer, KV head) pairs). None: "layer" with one of
    # LAYER_FLAGS, else DEFAULT_GRANULARITY; with "head", calibration None
    # means the built-in retrieval prompts (the combination measured).
    granularity: str | None = None

    @property
    def scoring(self) -> bool:
        """Whether the layers come from calibration + scoring."""
        return self.preset is None and self.layers is None


@dataclass(frozen=True)
class ConvertResult:
    out: Path
    report: dict[str, Any]


@dataclass(frozen=True)
class ScoredSource:
    """Calibration + scoring of one model: the input of every selection."""

    scores: Any  # convert.scoring.LayerScores
    calibration_source: str
    seconds: dict[str, float]
    calibration_details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def per_prompt(self) -> list[list[float]]:
        return self.scores.per_prompt.tolist()


# ---------------------------------------------------------------- checks


def check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise LightTransferConfigError(f"--device={name}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LightTransferConfigError(f"--device={name}: CUDA is not available on this machine")


def check_options(
    options: ConvertOptions, check_device: Callable[[str], Any] = check_device
) -> ConvertOptions:
    """Validate ``options`` without touching the model; returns them with defaults filled in."""
    from vllm_lighttransfer.convert.retrieval import RETRIEVAL, RETRIEVAL_N_LAST, is_retrieval
    from vllm_lighttransfer.convert.scoring import validate_scoring_settings
    from vllm_lighttransfer.convert.select import check_lazy_ratio, check_threshold

    o = options
    layer_flags = [f for f, v in zip(LAYER_FLAGS, (o.layers, o.preset, o.max_loss)) if v is not None]
    if o.granularity is None:
        o = dataclasses.replace(o, granularity="layer" if layer_flags else DEFAULT_GRANULARITY)
    if o.granularity not in GRANULARITIES:
        raise LightTransferConfigError(
            f"--granularity={o.granularity}: expected one of {', '.join(GRANULARITIES)}"
        )
    if o.granularity == "head":
        if layer_flags:
            what = ("fixes what streams" if layer_flags[0] == "--preset"
                    else "chooses whole layers")
            raise LightTransferConfigError(
                f"{layer_flags[0]} {what}; it cannot be combined with --granularity head "
                "(drop one of them)"
            )
        if o.calibration is None:
            o = dataclasses.replace(o, calibration=RETRIEVAL)
    if o.n_last is None:
        o = dataclasses.replace(
            o, n_last=RETRIEVAL_N_LAST if is_retrieval(o.calibration) else DEFAULT_N_LAST
        )
    if o.max_loss is not None and (
        not o.scoring or o.lazy_ratio is not None or o.threshold is not None
    ):
        raise LightTransferConfigError(
            "--max-loss chooses the lazy ratio itself; drop --lazy-ratio, --threshold, "
            "--layers and --preset"
        )
    if o.preset is not None:
        if o.sink_tokens is not None or o.window_tokens is not None:
            raise LightTransferConfigError(
                "--preset fixes the sink and window sizes; drop --sink-tokens/--window-tokens"
            )
        return o
    o = dataclasses.replace(
        o,
        sink_tokens=DEFAULT_SINK if o.sink_tokens is None else o.sink_tokens,
        window_tokens=DEFAULT_WINDOW if o.window_tokens is None else o.window_tokens,
    )
    if o.max_loss is not None:
        from vllm_lighttransfer.convert import search

        o = dataclasses.replace(
            o, max_loss=search.parse_max_loss(o.max_loss),
            search_ratios=search.parse_ratios(o.search_ratios or search.DEFAULT_RATIOS),
        )
        search.SearchSettings(o.max_loss, o.search_ratios, o.search_length).check(
            o.sink_tokens, o.window_tokens, None
        )
    elif o.search_ratios is not None or o.search_length is not None:
        raise LightTransferConfigError("--search-ratios and --search-length need --max-loss")
    if o.scoring and o.max_loss is None:
        if o.threshold is not None:
            check_threshold(o.threshold)
        else:
            o = dataclasses.replace(
                o, lazy_ratio=DEFAULT_LAZY_RATIO if o.lazy_ratio is None else o.lazy_ratio
            )
            check_lazy_ratio(o.lazy_ratio)
    if o.scoring and o.calibration_count < 1:
        raise LightTransferConfigError(
            f"--calibration-count={o.calibration_count}: expected an integer >= 1"
        )
    validate_scoring_settings(
        o.sink_tokens, o.window_tokens, o.n_last, o.calibration_length if o.scoring else None
    )
    if o.scoring:
        check_device(o.device)
    return o


def check_paths(src: Path, out: Path, force: bool) -> None:
    if not src.exists():
        raise LightTransferConfigError(f"SRC={src}: no such file or folder")
    if out.exists() and not force:
        raise LightTransferConfigError(f"OUT={out} exists; pass --force to replace it")
    s, o = src.resolve(), out.resolve()
    if s == o or o in s.parents or s in o.parents:
        raise LightTransferConfigError(
            f"OUT={out} must be outside SRC={src} and must not contain it"
        )


def read_source_config(folder: Path, shown: str) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LightTransferConfigError(f"SRC={shown}: config.json is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LightTransferConfigError(f"SRC={shown}: config.json is not a JSON object")
    if SECTION in config or any(a in ARCHITECTURES for a in config.get("architectures") or []):
        raise LightTransferConfigError(
            f"SRC={shown} is already a LightTransfer conversion; convert its source instead"
        )
    return config


# ---------------------------------------------------------------- source


@contextlib.contextmanager
def open_source(
    src: Path, scratch_parent: Path, prefix: str = ".gguf-"
) -> Iterator[tuple[Path, str, dict[str, float]]]:
    """Yield ``(hf_dir, kind, timings)`` for ``src``; ``kind`` is "hf" or "gguf".

    A GGUF file is dequantized into a hidden scratch folder under
    ``scratch_parent`` (the folder OUT goes to, so the weights can be moved
    into OUT instead of copied); the scratch folder is removed on exit.
    """
    from vllm_lighttransfer.convert.sources import gguf_to_hf, is_hf_folder

    timings: dict[str, float] = {}
    if is_hf_folder(src):
        yield src, "hf", timings
        return
    if not (src.is_file() and src.suffix.lower() == ".gguf"):
        raise LightTransferConfigError(
            f"SRC={src}: not a model (expected a folder with config.json or a .gguf file)"
        )
    scratch_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch_parent))
    try:
        logger.info("dequantizing %s into a plain HF folder", src)
        t0 = time.perf_counter()
        try:
            hf_dir = gguf_to_hf(src, work / "hf")
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise LightTransferConfigError(
                f"SRC={src}: cannot read this GGUF file "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc
        timings["gguf_to_hf"] = time.perf_counter() - t0
        yield hf_dir, "gguf", timings
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- scoring


def score_source(
    hf_dir: Path,
    sink_tokens: int = DEFAULT_SINK,
    window_tokens: int = DEFAULT_WINDOW,
    n_last: int | None = None,
    calibration: str | Path | None = None,
    calibration_length: int = DEFAULT_CAL_LENGTH,
    calibration_count: int = DEFAULT_CAL_COUNT,
    dtype: str = "float32",
    device: str = "cpu",
    progress: bool = True,
    model: Any = None,
) -> ScoredSource:
    """Calibration prompts from ``calibration`` (default: the built-in essays;
    ``"retrieval"``: the built-in retrieval prompts), then every layer's and
    KV head's laziness score on them (``convert.scoring``).

    ``n_last``: ``None`` is the calibration's default (see module doc).
    ``model``: an already loaded causal LM of ``hf_dir`` (else it is loaded
    here and freed afterwards).
    """
    from transformers import AutoTokenizer

    from vllm_lighttransfer.convert import calibration as cal
    from vllm_lighttransfer.convert import retrieval as ret
    from vllm_lighttransfer.convert.scoring import check_prompt_length, load_model, score_layers

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    details: dict[str, Any] = {}
    if ret.is_retrieval(calibration):
        n_last = ret.RETRIEVAL_N_LAST if n_last is None else n_last
        built = ret.retrieval_prompts(
            tokenizer, calibration_length, calibration_count, sink_tokens, window_tokens
        )
        prompts = [list(p.token_ids) for p in built]
        cal_source = ret.RETRIEVAL_DESCRIPTION
        details = {"seed": ret.RETRIEVAL_SEED, "fact_start": [p.fact_start for p in built],
                   "fact_tokens": [p.fact_tokens for p in built]}
    else:
        n_last = DEFAULT_N_LAST if n_last is None else n_last
        texts, cal_source = cal.load_texts(calibration)
        prompts = cal.calibration_prompts(tokenizer, texts, calibration_length, calibration_count)
    logger.info("calibration: %d prompts of %s tokens from %s",
                len(prompts), sorted({len(p) for p in prompts}), cal_source)
    # Fail on too-short calibration before the model loads.
    for p in prompts:
        check_prompt_length(len(p), sink_tokens, window_tokens, n_last)
    seconds: dict[str, float] = {}
    if model is None:
        t0 = time.perf_counter()
        model = load_model(str(hf_dir), dtype=dtype, device=device)
        seconds["model_load"] = time.perf_counter() - t0
    scores = score_layers(model, prompts, sink_tokens, window_tokens, n_last, progress=progress)
    seconds["scoring"] = scores.seconds
    return ScoredSource(scores, cal_source, seconds, details)


def _scored_layers(
    options: ConvertOptions, hf_dir: Path, config: dict[str, Any]
) -> tuple[list[int], list[list[int]] | None, dict, dict, dict, dict[str, float], dict | None]:
    """Calibrate, score and select; returns layers, streaming KV heads
    (``granularity="head"`` only, else None), settings, scores, selection,
    timings and the quality search's report part (``max_loss`` only)."""
    from vllm_lighttransfer.convert.select import (
        select_by_ratio,
        select_by_threshold,
        select_heads,
    )
    from vllm_lighttransfer.convert.writer import base_architecture

    o = options
    model = search = None
    seconds: dict[str, float] = {}
    if o.max_loss is not None:
        from vllm_lighttransfer.convert.scoring import load_model
        from vllm_lighttransfer.convert.search import SearchSettings

        search = SearchSettings(o.max_loss, o.search_ratios, o.search_length)
        search.check(o.sink_tokens, o.window_tokens, config.get("max_position_embeddings"))
        t0 = time.perf_counter()
        model = load_model(str(hf_dir), dtype=o.dtype, device=o.device)  # once for both steps
        seconds["model_load"] = time.perf_counter() - t0
    scored = score_source(
        hf_dir, o.sink_tokens, o.window_tokens, o.n_last, o.calibration,
        o.calibration_length, o.calibration_count, o.dtype, o.device, o.progress, model=model,
    )
    seconds.update(scored.seconds)
    scores, per_prompt = scored.scores, scored.per_prompt
    search_part = None
    heads = head_sel = None
    if o.granularity == "head":
        rule = "threshold" if o.threshold is not None else "lazy_ratio"
        head_sel = select_heads(
            scores.per_kv_head.tolist(), rule, o.threshold if rule == "threshold" else o.lazy_ratio
        )
        heads = [list(h) for h in head_sel.streaming_kv_heads]
    elif search is not None:
        from transformers import AutoTokenizer

        from vllm_lighttransfer.convert.search import run_search

        context = int(config.get("max_position_embeddings") or 0)
        chosen, search_part = run_search(
            model, AutoTokenizer.from_pretrained(str(hf_dir)), per_prompt,
            base_architecture(config), o.sink_tokens, o.window_tokens, context, search,
            progress=o.progress,
        )
        seconds["quality_search"] = search_part["seconds"]
        del model
        # The ratio chosen; with none, the smallest one's ranking, no layer lazy.
        sel = select_by_ratio(per_prompt, chosen.ratio if chosen else search.ratios[0])
        if chosen is None:
            sel = dataclasses.replace(sel, lazy_layers=())
    elif o.threshold is not None:
        sel = select_by_threshold(per_prompt, o.threshold)
    else:
        sel = select_by_ratio(per_prompt, o.lazy_ratio)
    settings = {
        "granularity": o.granularity,
        "sink_tokens": o.sink_tokens,
        "window_tokens": o.window_tokens,
        "n_last": o.n_last,
        "calibration": {
            "source": scored.calibration_source,
            "length": o.calibration_length,
            "count": o.calibration_count,
            "prompts_used": len(scores.prompt_lengths),
            "prompt_tokens": list(scores.prompt_lengths),
            **scored.calibration_details,
        },
        "dtype": o.dtype,
        "device": o.device,
    }
    if search_part is not None:
        settings["max_loss"] = o.max_loss
        settings["chosen_ratio"] = search_part["chosen_ratio"]
    score_dict = {
        "mean": scores.mean,
        "std": scores.std,
        "per_prompt": per_prompt,
        "per_head_mean": scores.per_head.mean(dim=0).tolist(),
        "kv_head_mean": scores.kv_head_mean,
        "kv_head_per_prompt": scores.per_kv_head.tolist(),
    }
    if head_sel is not None:
        # Frequencies are the (layer, KV head) pairs'; a layer has none here.
        score_dict["kv_head_lazy_frequency"] = [list(f) for f in head_sel.lazy_frequency]
        return [], heads, settings, score_dict, head_sel.to_dict(), seconds, None
    score_dict["lazy_frequency"] = list(sel.lazy_frequency)
    selection = sel.to_dict()
    if search_part is not None:
        selection.update(rule="max_loss", max_loss=o.max_loss, lazy_ratio=search_part["chosen_ratio"])
    return list(sel.lazy_layers), None, settings, score_dict, selection, seconds, search_part


# ---------------------------------------------------------------- convert


def convert(options: ConvertOptions) -> ConvertResult:
    """Run the whole conversion (see module doc). Raises on any failure."""
    from vllm_lighttransfer.convert.presets import check_preset_matches, load_preset
    from vllm_lighttransfer.convert.report import (
        PLOT_FILE,
        REPORT_FILE,
        build_report,
        plot_scores,
        provenance,
    )
    from vllm_lighttransfer.convert.select import parse_layers
    from vllm_lighttransfer.convert.writer import base_architecture, converted_config, write_converted

    o = check_options(options)
    src, out = Path(o.src).expanduser(), Path(o.out).expanduser()
    check_paths(src, out, o.force)
    t_start = time.perf_counter()

    with open_source(src, out.resolve().parent, f".{out.name}.gguf-") as (hf_dir, kind, timings):
        config = read_source_config(hf_dir, str(src))
        base = base_architecture(config, str(src))
        num_layers = config.get("num_hidden_layers")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise LightTransferConfigError(f"SRC={src}: config.json has no valid num_hidden_layers")
        source = {"path": str(src.resolve()), "kind": kind}
        if config.get("_name_or_path") or config.get("_model_name_or_path"):
            source["name"] = config.get("_name_or_path") or config.get("_model_name_or_path")

        scores = selection = search = heads = None
        if o.preset is not None:
            preset = load_preset(o.preset)
            check_preset_matches(preset, config, base)
            layers = list(preset["lazy_layers"])
            if preset.get("streaming_kv_heads") is not None:  # a per-KV-head preset
                heads = [list(h) for h in preset["streaming_kv_heads"]]
            sink, window = preset["sink_tokens"], preset["window_tokens"]
            method = "preset"
            settings: dict[str, Any] = {
                "preset": preset.get("name", Path(preset["_path"]).stem),
                "preset_sources": preset.get("sources", []),
            }
        elif o.layers is not None:
            layers = parse_layers(o.layers, num_layers)
            sink, window, method = o.sink_tokens, o.window_tokens, "layers"
            settings = {}
        else:
            from vllm_lighttransfer.convert.scoring import validate_scoring_settings

            validate_scoring_settings(
                o.sink_tokens, o.window_tokens, o.n_last,
                o.calibration_length, config.get("max_position_embeddings"),
            )
            layers, heads, settings, scores, selection, score_timings, search = _scored_layers(
                o, hf_dir, config
            )
            timings.update(score_timings)
            sink, window, method = o.sink_tokens, o.window_tokens, "scored"
        if not layers and not any(heads or ()):
            what = "layer" if heads is None else "KV head"
            logger.warning("no %s selected as lazy: OUT will serve full attention everywhere", what)

        # Validate the section once without provenance, then with it.
        new_config = converted_config(config, layers, sink, window, streaming_kv_heads=heads)
        timings["total"] = time.perf_counter() - t_start
        report = build_report(
            source=source, config=new_config, method=method, settings=settings,
            scores=scores, selection=selection, timings=timings,
        )
        new_config = converted_config(
            config, layers, sink, window, provenance(report), streaming_kv_heads=heads
        )
        if search is not None:
            report["quality_search"] = search
        extra = {REPORT_FILE: (json.dumps(report, indent=2) + "\n").encode()}
        if scores is not None:
            name = src.stem if kind == "gguf" else src.resolve().name
            title = (
                f"{name}: lazy-layer scores (sink {sink}, window {window}, last "
                f"{o.n_last} queries, {len(scores['per_prompt'])} x "
                f"{max(settings['calibration']['prompt_tokens'])}-token prompts)"
            )
            if heads is None:
                extra[PLOT_FILE] = plot_scores(
                    scores["mean"], scores["std"], scores["lazy_frequency"], layers, title,
                    threshold=o.threshold,
                )
            else:
                extra[PLOT_FILE] = plot_scores(
                    scores["mean"], scores["std"], None, layers, title, threshold=o.threshold,
                    kv_head_scores=scores["kv_head_mean"], streaming_kv_heads=heads,
                )
        if search is not None:
            from vllm_lighttransfer.convert.search import PLOT_FILE as SEARCH_PLOT, plot_search

            probes = search["probes"]
            extra[SEARCH_PLOT] = plot_search(search, (
                f"{name}: quality against lazy ratio ({probes['length']}-token probes, "
                f"sink {sink}, window {window}; budget {o.max_loss:g})"
            ))
        try:
            write_converted(
                hf_dir, out, new_config, link=not o.copy, force=o.force,
                extra_files=extra, move=kind == "gguf",
            )
        except FileExistsError as exc:
            raise LightTransferConfigError(str(exc)) from None
    if heads is None:
        logger.info("lazy layers (%d of %d): %s", len(layers), num_layers, layers)
    else:
        logger.info("streaming KV heads: %d of %d", report["num_streaming_kv_heads"],
                    num_layers * report["num_kv_heads"])
    return ConvertResult(out, report)
