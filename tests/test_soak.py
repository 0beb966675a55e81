"""The quick soak (``bench/soak.py --quick``) meets its targets.

A real ``vllm serve`` of the converted tiny Llama, started through
``scripts/serve_default.sh`` with the main job's flags, under 60 s of warm-up
and 80 s of a seeded abusive mix (long prompts past the window, n > 1, shared
prefixes, disconnects, invalid requests, bursts beyond the KV cache), then
compared with an in-process engine. About 4 to 7 minutes on 2 cores (server
start-up and torch.compile included).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.serve, pytest.mark.slow]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("soak")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500, cwd=str(ROOT))
    path = out / "soak.json"
    if not path.exists():
        pytest.fail(f"soak.py wrote no report (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    print(proc.stdout[-2500:])
    data = json.loads(path.read_text())
    data["_rc"] = proc.returncode
    data["_md"] = (out / "soak.md").read_text()
    return data


def test_quick_soak_meets_targets(report):
    r = report
    assert r["requests"] > 100
    assert r["failed_5xx"] == 0, r["examples_5xx"]
    assert r["hung"] == 0
    assert r["invalid_total"] > 0
    assert r["invalid_rejected_4xx"] == r["invalid_total"], r["invalid_failures"]
    assert r["probe_reference"].startswith("in-process"), r["probe_reference"]
    assert r["probe_mismatches"] == 0, r["probe_mismatch_details"]
    assert r["preemptions_in_bursts"] > 0, r["bursts"]
    assert r["kv_usage_after_drain"] == 0.0
    assert r["rss_growth"] < 0.10, r["rss_by_process_mib"]
    assert r["server_alive"]
    assert r["passed"] and r["_rc"] == 0


def test_quick_soak_covers_the_mix(report):
    kinds = report["by_kind"]
    for kind in ("short", "long", "n_best", "prefix", "chat", "disconnect", "invalid", "burst", "probe"):
        assert kinds.get(kind, 0) > 0, kinds
    # every invalid case was sent at least once, each answered with vLLM's message
    assert len(report["invalid_cases"]) == 11, sorted(report["invalid_cases"])
    assert {"before", "after"} <= set(report["probe_rounds"])
    assert any(name.startswith("during") for name in report["probe_rounds"])
    assert "| failed_5xx | 0 |" in report["_md"]
