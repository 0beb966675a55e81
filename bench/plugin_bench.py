"""KV capacity and decode throughput: converted vs unconverted vs vLLM's sliding window.

Runs each variant in a real in-process vLLM engine (CPU build) on the same
model, one after the other in the same run, and prints one table with ratios
against the unconverted model:

  full        the unconverted model (full attention everywhere)
  lighttransfer  our plugin: the lazy layers on sink + window attention
  lighttransfer-head  per KV head at the same fraction (the same KV bytes):
              every other (layer, KV head) pair streams, so every layer is
              split into one attention module per KV head
  vllm-swa    stock vLLM, the same layers on its built-in sliding window
              (``layer_types``), no sinks; compared with ``lighttransfer-s0``,
              our backend with ``sink_tokens=0`` (identical semantics)

Figures
  * capacity: "KV cache size" (tokens) and "Maximum concurrency" that vLLM
    reports at startup for ``--max-model-len``, plus the analytic limit.
  * runtime concurrency: the most requests the scheduler really runs at once
    with the same KV bytes (long prompts, many requests).
  * decode: tokens/s of pure decode steps (timed after every prompt is
    prefilled), batch B at a context of P prompt tokens.

Usage (the README's table):
  python bench/plugin_bench.py --model smollm2 --prompt-tokens 4096 --batch 4
  python bench/plugin_bench.py --model tiny --prompt-tokens 1500   # minutes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in process

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_lighttransfer.config import LightTransferConfig, kv_bytes_ratio  # noqa: E402
from vllm_lighttransfer.convert.writer import convert_with_layers  # noqa: E402
from vllm_lighttransfer.offline import engine_core, offline_engine  # noqa: E402


def prepare_model(name: str, workdir: Path) -> Path:
    if name == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_model import build_tiny_llama  # a test helper, not shipped

        return build_tiny_llama(workdir / "tiny-llama", dtype="bfloat16")
    if name == "smollm2":
        from vllm_lighttransfer.convert.sources import resolve_source, smollm2_gguf

        return resolve_source(smollm2_gguf(), workdir)
    return Path(name)


def stock_sliding_window(src: Path, out: Path, layers: list[int], window: int) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), out / item.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_types"] = [
        "sliding_attention" if i in layers else "full_attention"
        for i in range(cfg["num_hidden_layers"])
    ]
    cfg["sliding_window"] = window
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def engine(model: Path, args, **overrides):
    kwargs = dict(
        enforce_eager=True,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        block_size=32,
        skip_tokenizer_init=True,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        seed=0,
        # Float32 logits for every variant: converted folders ask for them
        # (convert/writer.py), so the unconverted one must pay the same head.
        hf_overrides={"head_dtype": "float32"},
    )
    kwargs.update(overrides)
    return offline_engine(model, **kwargs)


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def measure_capacity(llm) -> dict:
    cache = engine_core(llm).vllm_config.cache_config
    kv_config = engine_core(llm).scheduler.kv_cache_manager.kv_cache_config
    return {
        "kv_tokens": cache.kv_cache_size_tokens,
        "max_concurrency": cache.kv_cache_max_concurrency,
        "num_blocks": kv_config.num_blocks,
        # A block id belongs to one group at a time and holds a page of each
        # of that group's layers (vLLM sizes hybrid groups equally).
        "bytes_per_block": max(
            g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in kv_config.kv_cache_groups
        ),
    }


def measure_interleaved(llms: dict, prompts, decode_steps: int) -> dict[str, dict]:
    """Prefill then decode the same batch on every engine, one step each in turn.

    Each engine's steps are timed on their own; taking turns step by step
    spreads the noise of a shared machine evenly over the variants.
    """
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True)
    state = {}
    for name, llm in llms.items():
        for i, p in enumerate(prompts):
            llm.llm_engine.add_request(f"{name}-{i}", {"prompt_token_ids": p}, params)
        state[name] = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "phase": "prefill"}

    def prefilling(llm) -> bool:
        scheduler = engine_core(llm).scheduler
        return bool(scheduler.waiting) or any(r.num_output_tokens < 1 for r in scheduler.requests.values())

    active = set(llms)
    while active:
        for name in list(active):
            llm, st = llms[name], state[name]
            if not llm.llm_engine.has_unfinished_requests():
                active.discard(name)
                continue
            phase = "prefill" if prefilling(llm) else "decode"
            if phase == "decode" and st["phase"] == "prefill":
                st["phase"] = "decode"
                st["batch_running"] = len(engine_core(llm).scheduler.running)
            t = time.perf_counter()
            llm.llm_engine.step()
            dt = time.perf_counter() - t
            st[f"{phase}_s"] += dt
            if phase == "decode":
                st["decode_steps"] += 1
    out = {}
    for name, st in state.items():
        out[name] = {
            "prefill_s": st["prefill_s"],
            "prefill_tok_s": sum(map(len, prompts)) / st["prefill_s"],
            "decode_s": st["decode_s"],
            "decode_tok_s": decode_steps * len(prompts) / st["decode_s"],
            "decode_steps": st["decode_steps"],
            "batch_running": st.get("batch_running"),
        }
    return out


def measure_runtime_concurrency(llm, prompts, max_tokens: int) -> dict:
    """Most requests the scheduler runs at once with the KV bytes it has."""
    from vllm import SamplingParams

    engine_ = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine_.add_request(f"c{i}", {"prompt_token_ids": p}, params)
    scheduler = engine_core(llm).scheduler
    most = 0
    while engine_.has_unfinished_requests():
        engine_.step()
        most = max(most, len(scheduler.running))
    return {"max_running": most}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="tiny | smollm2 | path to an HF folder")
    ap.add_argument("--lazy-ratio", type=float, default=0.5, help="lazy layers: every other layer")
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--window-tokens", type=int, default=1020)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-space-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE per variant")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--concurrency-blocks", type=int, default=0,
                    help="num_gpu_blocks for the runtime-concurrency run (0: skip it)")
    ap.add_argument("--concurrency-requests", type=int, default=24)
    ap.add_argument("--variants", default="full,lighttransfer,lighttransfer-s0,vllm-swa")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--workdir", default=str(ROOT / "models"))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gib)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = prepare_model(args.model, workdir)
    cfg = json.loads((src / "config.json").read_text())
    n_layers, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    step = max(1, round(1 / args.lazy_ratio))
    lazy = list(range(1, n_layers, step))[: round(args.lazy_ratio * n_layers)]
    # Per KV head at the same fraction (the same KV bytes): every other
    # (layer, KV head) pair, so that every layer is split (the per-head
    # layout's worst case: one attention call per KV head everywhere).
    hkv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    pairs = set(list(range(1, n_layers * hkv, step))[: round(args.lazy_ratio * n_layers * hkv)])
    heads = [[j for j in range(hkv) if i * hkv + j in pairs] for i in range(n_layers)]

    tmp = Path(tempfile.mkdtemp(prefix="lt-bench-"))
    folders = {
        "full": src,
        "lighttransfer": convert_with_layers(src, tmp / "lt", lazy, args.sink_tokens, args.window_tokens),
        "lighttransfer-s0": convert_with_layers(src, tmp / "lt-s0", lazy, 0, args.window_tokens),
        "lighttransfer-head": convert_with_layers(src, tmp / "lt-head", [], args.sink_tokens,
                                                  args.window_tokens, streaming_kv_heads=heads),
        "vllm-swa": stock_sliding_window(src, tmp / "swa", lazy, args.window_tokens),
    }
    lt_cfg = LightTransferConfig.from_hf_config(
        json.loads((folders["lighttransfer"] / "config.json").read_text())
    )
    analytic = 1 / kv_bytes_ratio(lt_cfg, args.max_model_len, block_size=32)
    print(f"model {src} ({n_layers} layers), lazy layers {lazy}", flush=True)

    prompts = prompts_for(args.batch, args.prompt_tokens, vocab, seed=0)
    names = args.variants.split(",")
    results: dict[str, dict] = {name: {} for name in names}
    with contextlib.ExitStack() as stack:
        llms = {}
        for name in names:
            print(f"[{name}] starting engine", flush=True)
            llms[name] = stack.enter_context(engine(folders[name], args))
            results[name].update(measure_capacity(llms[name]))
        if not args.skip_decode:
            print(f"prefill + decode, {args.batch} x {args.prompt_tokens} tokens, interleaved ...", flush=True)
            for name, row in measure_interleaved(llms, prompts, args.decode_steps).items():
                results[name].update(row)
    if args.concurrency_blocks:
        # Same KV bytes for every variant: --concurrency-blocks blocks of the
        # unconverted model; a converted model's block (page) holds fewer
        # layers, so the same bytes make more of them.
        conc_prompts = prompts_for(args.concurrency_requests, args.prompt_tokens, vocab, seed=1)
        kv_bytes = args.concurrency_blocks * results["full"]["bytes_per_block"]
        for name in names:
            blocks = kv_bytes // results[name]["bytes_per_block"]
            with engine(folders[name], args, num_gpu_blocks_override=int(blocks),
                        max_model_len=args.prompt_tokens + 64) as llm:
                results[name].update(measure_runtime_concurrency(llm, conc_prompts, max_tokens=8))
    for name, row in results.items():
        print(f"[{name}] {row}", flush=True)

    base = results.get("full", {})
    lines = [
        f"model={args.model} layers={n_layers} lazy={len(lazy)} sink={args.sink_tokens} "
        f"window={args.window_tokens} max_model_len={args.max_model_len} "
        f"max_num_batched_tokens={args.max_num_batched_tokens} dtype={args.dtype} "
        f"prompt={args.prompt_tokens} batch={args.batch}",
        "",
        "| variant | KV tokens | max concurrency | x full | decode tok/s | x full | prefill tok/s | max running | x full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    for name, row in results.items():
        lines.append(
            f"| {name} | {row.get('kv_tokens', '-'):,} | {row.get('max_concurrency', 0):.2f} | "
            f"{ratio(row.get('max_concurrency'), base.get('max_concurrency'))} | "
            f"{row.get('decode_tok_s', 0):.1f} | {ratio(row.get('decode_tok_s'), base.get('decode_tok_s'))} | "
            f"{row.get('prefill_tok_s', 0):.1f} | {row.get('max_running', '-')} | "
            f"{ratio(row.get('max_running'), base.get('max_running'))} |"
        )
    if "lighttransfer-s0" in results and "vllm-swa" in results:
        a, b = results["lighttransfer-s0"], results["vllm-swa"]
        lines.append("")
        lines.append(
            f"lazy-layer backend vs vLLM CPU sliding-window kernel (sink 0, same layers): "
            f"decode {ratio(a.get('decode_tok_s'), b.get('decode_tok_s'))}x"
        )
    lines.append(f"analytic KV capacity limit (block 32): {analytic:.3f}x")
    table = "\n".join(lines)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "analytic": analytic}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
