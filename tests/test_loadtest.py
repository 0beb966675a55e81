"""The load-test tool's own parts: parsing, the side-by-side table, its outputs.

Fast (no vLLM engine): vLLM's log line, /metrics text and ``vllm bench
serve`` result JSON are fed as text in the formats vLLM 0.32.0 writes them,
and a local HTTP stub stands in for a server the tool attaches to. One optional end-to-end run (marked ``serve``, ``slow``) starts
two real servers of the tiny model, unconverted and converted, and checks the
tool end to end; it is skipped unless LT_LOADTEST_E2E=1 (70-110 s on 2 CPU
cores; on a shared machine run it under ``flock /tmp/lt-heavy.lock``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("loadtest", ROOT / "bench" / "loadtest.py")
loadtest = importlib.util.module_from_spec(spec)
sys.modules["loadtest"] = loadtest
spec.loader.exec_module(loadtest)


CPU_LOG = """\
(EngineCore pid=123) INFO 11-29 07:10:01 [kv_cache_utils.py:1234] some other line
(EngineCore pid=123) INFO 11-29 07:10:02 [kv_cache_utils.py:2328] CPU KV cache size: 46,336 tokens, \
Maximum concurrency for 8,192 tokens per request: 5.66x
(APIServer pid=100) INFO 11-29 07:10:30 [api_server.py:1] Starting vLLM API server 0 on http://127.0.0.1:8000
"""

GPU_LOG = (
    "INFO [kv_cache_utils.py:2328] GPU KV cache size: 1,234,567 tokens, "
    "Maximum concurrency for 131,072 tokens per request: 9.42x\n"
)

METRICS = """\
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",cache_dtype="auto",engine="0",kv_cache_max_concurrency="10.01953125",\
kv_cache_size_tokens="82080",num_gpu_blocks="2565",prefix_caching_hash_algo="sha256"} 1.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.875
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2.0
vllm:num_preemptions_total{engine="0",model_name="m"} 0.0
"""


def bench_json(**over) -> dict:
    """A ``vllm bench serve --save-result --save-detailed`` result (0.32.0 keys)."""
    data = {
        "date": "20251129-071000", "backend": "vllm", "model_id": "m", "num_prompts": 4,
        "request_rate": "inf", "max_concurrency": 4, "duration": 100.0, "completed": 4,
        "failed": 0, "total_input_tokens": 20000, "total_output_tokens": 256,
        "request_throughput": 0.04, "output_throughput": 2.56, "total_token_throughput": 202.56,
        "input_lens": [4100, 5000, 5900, 5000], "output_lens": [64] * 4,
        "errors": ["", "", "", ""],
        "mean_ttft_ms": 50000.0, "median_ttft_ms": 48000.0, "p50_ttft_ms": 48000.0, "p99_ttft_ms": 90000.0,
        "mean_tpot_ms": 300.0, "median_tpot_ms": 290.0, "p50_tpot_ms": 290.0, "p99_tpot_ms": 400.0,
        "mean_itl_ms": 300.0, "median_itl_ms": 280.0, "p50_itl_ms": 280.0, "p99_itl_ms": 900.0,
        "mean_e2el_ms": 70000.0, "median_e2el_ms": 68000.0, "p99_e2el_ms": 110000.0,
    }
    data.update(over)
    return data


def test_parse_capacity_log_cpu_and_gpu():
    assert loadtest.parse_capacity_log(CPU_LOG) == {
        "pool": "CPU", "kv_cache_tokens": 46336, "max_model_len": 8192, "max_concurrency": 5.66,
    }
    gpu = loadtest.parse_capacity_log(GPU_LOG)
    assert gpu["pool"] == "GPU" and gpu["kv_cache_tokens"] == 1234567 and gpu["max_concurrency"] == 9.42
    assert loadtest.parse_capacity_log("no such line") is None
    # The last line wins (a restarted engine logs again).
    assert loadtest.parse_capacity_log(CPU_LOG + GPU_LOG)["pool"] == "GPU"


def test_parse_metrics():
    cap = loadtest.parse_cache_config_metrics(METRICS)
    assert cap == {"kv_cache_tokens": 82080, "max_concurrency": 10.01953125, "num_blocks": 2565, "block_size": 32}
    samples = loadtest.parse_prometheus(METRICS)
    assert loadtest.metric_sum(samples, "vllm:request_success_total") == 7.0
    assert loadtest.metric_sum(samples, "vllm:num_requests_running") == 7.0
    assert loadtest.metric_sum(samples, "vllm:kv_cache_usage_perc") == 0.875
    assert loadtest.metric_sum(samples, "vllm:nope") is None
    assert loadtest.parse_cache_config_metrics("vllm:num_requests_running 1.0\n") is None


def test_load_bench_result(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(bench_json(errors=["", "boom", "", ""], completed=3, failed=1)))
    r = loadtest.load_bench_result(path)
    assert r["completed"] == 3 and r["failed"] == 1 and r["errors"] == ["boom"]
    assert r["median_ttft_ms"] == 48000.0 and r["p99_itl_ms"] == 900.0 and r["median_e2el_ms"] == 68000.0
    assert (r["input_len_min"], r["input_len_max"]) == (4100, 5900)
    assert "first_prefill_tok_s" not in r  # no per-request TTFTs in this file
    path.write_text(json.dumps(bench_json(ttfts=[30.0, 20.0, 50.0, 40.0])))
    assert loadtest.load_bench_result(path)["first_prefill_tok_s"] == 5000 / 20.0
    # Without --save-detailed there are no per-request fields; failed still known.
    slim = {k: v for k, v in bench_json().items() if k not in ("errors", "input_lens", "output_lens")}
    path.write_text(json.dumps(slim))
    r = loadtest.load_bench_result(path)
    assert r["errors"] == [] and r["failed"] == 0 and "input_len_min" not in r


def sides():
    b = {"bench": {**bench_json(), "errors": []},
         "capacity_log": loadtest.parse_capacity_log(CPU_LOG),
         "observed": {"max_running": 4.0, "max_waiting": 2.0, "peak_kv_usage_pct": 99.0, "preemptions": 0.0}}
    c = {"bench": {**bench_json(duration=60.0, request_throughput=0.0667, output_throughput=4.27,
                               median_tpot_ms=200.0, median_ttft_ms=30000.0), "errors": []},
         "capacity_log": {"pool": "CPU", "kv_cache_tokens": 82080, "max_model_len": 8192,
                          "max_concurrency": 10.02},
         "observed": {"max_running": 4.0, "max_waiting": 0.0, "peak_kv_usage_pct": 60.0, "preemptions": 0.0}}
    return b, c


def test_compare_ratios_and_direction():
    b, c = sides()
    rows = {r["key"]: r for r in loadtest.compare(loadtest.flatten_side(b), loadtest.flatten_side(c))}
    assert rows["output_throughput"]["ratio"] == pytest.approx(4.27 / 2.56)
    assert rows["output_throughput"]["better"] == "candidate"
    assert rows["median_tpot_ms"]["ratio"] == pytest.approx(200 / 290)
    assert rows["median_tpot_ms"]["better"] == "candidate"  # lower is better
    assert rows["kv_cache_tokens"]["ratio"] == pytest.approx(82080 / 46336)
    assert rows["max_concurrency"]["ratio"] == pytest.approx(10.02 / 5.66)
    assert rows["failed"]["ratio"] is None and rows["failed"]["candidate"] == 0
    assert rows["p99_ttft_ms"]["ratio"] == 1.0 and rows["p99_ttft_ms"]["better"] is None
    # Capacity falls back to /metrics when the log line is missing (attached server).
    b.pop("capacity_log")
    b["capacity_metrics"] = loadtest.parse_cache_config_metrics(METRICS)
    assert loadtest.flatten_side(b)["kv_cache_tokens"] == 82080
    # A metric neither side has is left out; a zero baseline gives no ratio.
    assert loadtest.compare({}, {}) == []
    assert loadtest.ratio(1.0, 0.0) is None and loadtest.ratio(None, 1.0) is None


def test_markdown_json_and_chart(tmp_path):
    b, c = sides()
    rows = loadtest.compare(loadtest.flatten_side(b), loadtest.flatten_side(c))
    names = {"baseline": "smollm2", "candidate": "smollm2-lt"}
    md = loadtest.render_markdown(rows, names, ["Workload: test."])
    lines = md.splitlines()
    assert lines[0] == "| metric | baseline: smollm2 | candidate: smollm2-lt | candidate / baseline |"
    assert "| output throughput (tok/s) | 2.56 | 4.27 | 1.67x (better) |" in lines
    assert "| TPOT median (ms) | 290.0 | 200.0 | 0.69x (better) |" in lines
    assert "| KV cache size reported (tokens) | 46,336 | 82,080 | 1.77x (better) |" in lines
    assert "| failed requests | 0 | 0 | - |" in lines
    assert lines[-1] == "Workload: test."
    text = loadtest.render_text(rows, names)
    assert "output throughput (tok/s)" in text and "1.67x" in text

    report = {"rows": rows, "sides": {"baseline": b, "candidate": c}}
    written = loadtest.write_outputs(tmp_path / "out", report, md, "chart title")
    assert Path(written["markdown"]).read_text() == md
    back = json.loads(Path(written["json"]).read_text())
    assert back["rows"][0]["key"] == "completed"
    png = Path(written["chart"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_command_flags(tmp_path):
    args = loadtest.build_parser().parse_args(
        ["--baseline", "a", "--candidate", "b", "--input-len", "1000", "--output-len", "8",
         "--num-prompts", "3", "--max-concurrency", "2", "--bench-arg", "--num-warmups 0"])
    server = loadtest.Server("baseline", "a", base_url="http://127.0.0.1:1", model_name="m", tokenizer="/tok")
    cmd = loadtest.bench_command(server, args, tmp_path, "x.json")
    joined = " ".join(cmd)
    for piece in ("bench serve", "--dataset-name random", "--random-input-len 1000",
                  "--random-output-len 8", "--num-prompts 3", "--max-concurrency 2",
                  "--ignore-eos", "--metric-percentiles 50,99", "--tokenizer /tok", "--model m",
                  "--base-url http://127.0.0.1:1", "--save-result", "--num-warmups 0"):
        assert piece in joined
    ranges = json.loads(cmd[cmd.index("--random-range-ratio") + 1])
    assert ranges == {"input": 0.2, "output": 0.0}


def test_analytic_limit(tmp_path):
    from vllm_lighttransfer.convert.writer import convert_with_layers
    from tiny_model import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny")
    conv = convert_with_layers(tiny, tmp_path / "conv", [1, 3], 4, 60)
    # 4 layers, 2 lazy; at 1024 tokens, block 32: lazy layers keep 1 + 2 + 1 blocks of 32.
    assert loadtest.analytic_limit(str(conv), 1024, 32) == pytest.approx(1 / ((2 * 32 + 2 * 4) / (4 * 32)))
    assert loadtest.analytic_limit(str(tiny), 1024, 32) is None
    assert loadtest.analytic_limit("http://127.0.0.1:1", 1024, 32) is None


@pytest.mark.serve
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LT_LOADTEST_E2E") != "1", reason="set LT_LOADTEST_E2E=1 (70-110 s)")
def test_end_to_end_tiny(tmp_path):
    from vllm_lighttransfer.convert.writer import convert_with_layers
    from tiny_model import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "tiny-llama")
    conv = convert_with_layers(tiny, tmp_path / "tiny-lt", [1, 3], 4, 60)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loadtest.py"), "--baseline", str(tiny),
         "--candidate", str(conv), "--input-len", "300", "--output-len", "8", "--num-prompts", "4",
         "--max-concurrency", "2", "--max-model-len", "1024", "--dtype", "float32",
         "--server-arg=--enforce-eager", "--progress-every", "5", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "loadtest.json").read_text())
    for side in ("baseline", "candidate"):
        bench = report["sides"][side]["bench"]
        assert bench["completed"] == 4 and bench["failed"] == 0
        assert report["sides"][side]["capacity_log"]["max_model_len"] == 1024
    rows = {r["key"]: r for r in report["rows"]}
    assert rows["kv_cache_tokens"]["ratio"] > 1.0  # the converted model reports more capacity
    assert (out / "loadtest.md").exists() and (out / "loadtest.png").exists()


def test_parse_architecture_log():
    log = "INFO [model.py:733] Resolved architecture: LlamaForCausalLM\n" \
          "INFO [model.py:733] Resolved architecture: LightTransferLlamaForCausalLM\n"
    assert loadtest.parse_architecture_log(log) == "LightTransferLlamaForCausalLM"
    assert loadtest.parse_architecture_log("") is None


def test_kill_group_stops_leader_and_children():
    import time

    proc = subprocess.Popen(["sh", "-c", "sleep 100 & echo $!; wait"], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    loadtest._kill_group(proc, grace_s=5)
    assert proc.returncode is not None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)  # still there (or a zombie not yet reaped by init)?
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the child in the process group survived")
    loadtest._kill_group(None)  # nothing started: no error


def test_render_from_saved_report(tmp_path, capsys):
    b, c = sides()
    raw = {}
    for side, over in (("baseline", {}), ("candidate", {"output_throughput": 5.12})):
        raw[side] = tmp_path / f"{side}-bench.json"
        raw[side].write_text(json.dumps(bench_json(**over)))
    report = {
        "args": {"max_model_len": 8192, "block_size": 32}, "workload": "w", "servers": "s",
        "total_wall_s": 600.0, "analytic_kv_limit": 1.766,
        "sides": {"baseline": {**b, "model_name": "base"}, "candidate": {**c, "model_name": "cand"}},
        "raw_results": {k: str(v) for k, v in raw.items()},
    }
    (tmp_path / "loadtest.json").write_text(json.dumps(report))
    assert loadtest.main(["--render", str(tmp_path / "loadtest.json")]) == 0
    md = (tmp_path / "loadtest.md").read_text()
    assert "| output throughput (tok/s) | 2.56 | 5.12 | 2.00x (better) |" in md  # re-read from raw
    assert "Analytic KV capacity limit at 8,192 tokens (block 32): 1.77x." in md
    assert "Total wall time: 10.0 min." in md
    assert (tmp_path / "loadtest.png").exists()
    assert "output throughput" in capsys.readouterr().out


def test_requires_both_sides():
    with pytest.raises(SystemExit):
        loadtest.main(["--baseline", "a"])


@pytest.fixture
def stub_server():
    """An OpenAI-style HTTP stub on 127.0.0.1: /v1/models, /metrics, /v1/completions."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, body: str, ctype: str = "application/json"):
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                self._send(json.dumps({"data": [{"id": "stub", "root": str(ROOT), "max_model_len": 4096}]}))
            elif self.path == "/metrics":
                self._send(METRICS, "text/plain")
            else:
                self.send_error(404)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(json.dumps({"choices": [{"text": "ok"}]}))

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_attach_to_url(stub_server, tmp_path):
    args = loadtest.build_parser().parse_args(["--baseline", stub_server + "/v1", "--candidate", "x"])
    with loadtest.started_server("baseline", args.baseline, args, tmp_path) as server:
        assert server.proc is None and server.base_url == stub_server
        assert (server.model_name, server.tokenizer, server.max_model_len) == ("stub", str(ROOT), 4096)
        assert loadtest.parse_cache_config_metrics(server.metrics_text())["kv_cache_tokens"] == 82080
        assert loadtest.warm_up(server) >= 0
        poller = loadtest.MetricsPoller(server, total=4, interval=0.05)
        poller.start()
        import time

        time.sleep(0.3)
        seen = poller.finish()
    assert seen["max_running"] == 7.0 and seen["peak_kv_usage_pct"] == 87.5 and seen["preemptions"] == 0.0
    note = loadtest.servers_note(args, {"baseline": {"attached": True, "base_url": stub_server,
                                                     "max_model_len": 4096}, "candidate": {}})
    assert note.startswith(f"baseline attached at {stub_server} (max-model-len 4096")
    assert "candidate started with --max-model-len 8192" in note


def test_not_a_model_folder(tmp_path):
    args = loadtest.build_parser().parse_args(["--baseline", str(tmp_path), "--candidate", "x"])
    with pytest.raises(SystemExit, match="not a URL and not a model folder"):
        with loadtest.started_server("baseline", args.baseline, args, tmp_path):
            pass


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--scenario", "decode-heavy"],
         dict(input_len=1024, output_len=5120, output_range=0.2, num_prompts=12, max_concurrency=12)),
        # An explicit flag wins over the scenario's value.
        (["--scenario", "decode-heavy", "--num-prompts", "4", "--output-len=4096"],
         dict(input_len=1024, output_len=4096, num_prompts=4)),
        (["--scenario", "prefill-heavy"], dict(input_len=5120, output_len=128, num_prompts=16)),
        ([], dict(input_len=5120, output_len=128)),  # the defaults: prefill-heavy
    ],
)
def test_scenarios(argv, expected):
    ap = loadtest.build_parser()
    args = ap.parse_args(["--baseline", "a", "--candidate", "b", *argv])
    loadtest.apply_scenario(ap, args, argv)
    for key, value in expected.items():
        assert getattr(args, key) == value, key
