"""Load test: an unconverted and a converted model, side by side, through the OpenAI API.

What it does
    Starts (or attaches to) two OpenAI-compatible vLLM servers, the baseline
    (unconverted model) and the candidate (LightTransfer-converted model),
    drives each with the same workload using vLLM's own ``vllm bench serve``
    (random dataset, same seed, same tokenizer, so the very same prompts), and
    prints one table side by side with the ratios candidate/baseline:

      * request throughput, output tokens/s, total tokens/s
      * TTFT, TPOT, ITL (median and p99), end-to-end latency (median)
      * completed and failed requests
      * the KV capacity each server reported at startup ("KV cache size: N
        tokens, Maximum concurrency for L tokens per request: X"), read from
        the server log and from ``vllm:cache_config_info`` on ``/metrics``
      * what really ran: the most requests running at once, the peak KV
        cache usage and the preemptions, sampled from ``/metrics`` every
        second while the benchmark runs

    It writes ``loadtest.md`` (the table), ``loadtest.json`` (everything,
    including the raw ``vllm bench serve`` results) and ``loadtest.png`` (a
    chart of the ratios) to ``--out``, with the server and benchmark logs.

Fairness
    The servers run one after the other, never at once: on a CPU machine two
    engines would share the cores and distort each other's timings. Started
    servers get identical flags (``--max-model-len``, ``--block-size``,
    ``--dtype``, ``--seed``, any ``--server-arg``) and the same
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB, CPU builds; ignored on GPU, where
    ``--gpu-memory-utilization`` or ``--kv-cache-memory-bytes`` through
    ``--server-arg`` set the KV budget). Both benchmarks use the baseline's
    tokenizer (a converted folder carries the same tokenizer) and the same
    ``--seed``, so they send the very same prompts; ``--ignore-eos`` fixes
    the output lengths. A short warm-up request runs before each benchmark.

Usage
    # two model folders: each server is started here on 127.0.0.1, a free port
    python bench/loadtest.py --baseline models/SmolLM2-135M-Instruct.Q4_1-hf \\
        --candidate models/smollm2-lighttransfer

    # attach to servers that already run (their flags are then yours to match)
    python bench/loadtest.py --baseline http://127.0.0.1:8000 \\
        --candidate http://127.0.0.1:8001 --tokenizer models/smollm2-lighttransfer

    # no run: rebuild the table and chart of an earlier run
    python bench/loadtest.py --render results/loadtest-smollm2/loadtest.json

    On a shared machine, hold the heavy-run lock:
    flock /tmp/lt-heavy.lock python bench/loadtest.py ...

Constraints
    Servers listen on 127.0.0.1 only and are stopped by process group at the
    end, also on Ctrl-C, SIGTERM or an error. Each benchmark is bounded by
    ``--num-prompts`` and ``--bench-timeout``. A URL must serve exactly the
    model the benchmark asks for (the first id of ``/v1/models`` unless
    ``--baseline-name``/``--candidate-name`` say otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("baseline", "candidate")

# ---------------------------------------------------------------- parsing

# "CPU KV cache size: 46,336 tokens, Maximum concurrency for 8,192 tokens per
# request: 5.66x" (GPU builds say "GPU KV cache size"; hisparse "GPU + host").
_CAPACITY_RE = re.compile(
    r"(?P<pool>[A-Z]+(?: \+ host)?) KV cache size: (?P<tokens>[\d,]+) tokens, "
    r"Maximum concurrency for (?P<len>[\d,]+) tokens per request: (?P<conc>[\d.]+)x"
)
_ARCH_RE = re.compile(r"Resolved architecture: (\w+)")
_METRIC_LINE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_capacity_log(text: str) -> dict[str, Any] | None:
    """The KV capacity a vLLM server logged at startup (the last such line)."""
    found = None
    for m in _CAPACITY_RE.finditer(text):
        found = m
    if found is None:
        return None
    return {
        "pool": found["pool"],
        "kv_cache_tokens": int(found["tokens"].replace(",", "")),
        "max_model_len": int(found["len"].replace(",", "")),
        "max_concurrency": float(found["conc"]),
    }


def parse_architecture_log(text: str) -> str | None:
    """The model class vLLM resolved ("Resolved architecture: ..."), if logged."""
    found = _ARCH_RE.findall(text)
    return found[-1] if found else None


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_LINE_RE.match(line)
        if m is None:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        labels = dict(_LABEL_RE.findall(m["labels"] or ""))
        samples.append((m["name"], labels, value))
    return samples


def metric_sum(samples: list[tuple[str, dict[str, str], float]], name: str) -> float | None:
    """Sum of every sample named ``name`` (all label sets, all engines)."""
    values = [v for n, _, v in samples if n == name]
    return sum(values) if values else None


def parse_cache_config_metrics(text: str) -> dict[str, Any] | None:
    """KV capacity from ``vllm:cache_config_info`` labels (None if absent)."""
    for name, labels, _ in parse_prometheus(text):
        if name != "vllm:cache_config_info":
            continue

        def num(key: str, kind=float):
            try:
                return kind(labels[key])
            except (KeyError, ValueError):
                return None

        return {
            "kv_cache_tokens": num("kv_cache_size_tokens", int),
            "max_concurrency": num("kv_cache_max_concurrency"),
            "num_blocks": num("num_gpu_blocks", int),
            "block_size": num("block_size", int),
        }
    return None


def load_bench_result(path: str | Path) -> dict[str, Any]:
    """The figures we compare, from a ``vllm bench serve --save-result`` JSON."""
    raw = json.loads(Path(path).read_text())
    keys = (
        "duration", "completed", "failed", "num_prompts", "max_concurrency", "request_rate",
        "total_input_tokens", "total_output_tokens",
        "request_throughput", "output_throughput", "total_token_throughput",
        "max_concurrent_requests",
    )
    out = {k: raw.get(k) for k in keys}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            out[f"{stat}_{metric}_ms"] = raw.get(f"{stat}_{metric}_ms")
    errors = [e for e in raw.get("errors") or [] if e]
    out["errors"] = errors[:5]  # a sample: the first few error messages
    if raw.get("input_lens"):
        out["input_len_min"], out["input_len_max"] = min(raw["input_lens"]), max(raw["input_lens"])
    ttfts = raw.get("ttfts") or []
    if ttfts and len(ttfts) == len(raw.get("input_lens") or []) and min(ttfts) > 0:
        # The first request answered was prefilled (nearly) alone: its prompt
        # tokens over its TTFT is the server's unloaded prefill speed.
        first = min(range(len(ttfts)), key=ttfts.__getitem__)
        out["first_prefill_tok_s"] = raw["input_lens"][first] / ttfts[first]
    if out["failed"] is None and out["completed"] is not None and out["num_prompts"] is not None:
        out["failed"] = out["num_prompts"] - out["completed"]
    return out


# ---------------------------------------------------------------- the table

# (key, label, number format, higher is better; None: neither)
ROWS: list[tuple[str, str, str, bool | None]] = [
    ("completed", "completed requests", "{:.0f}", True),
    ("failed", "failed requests", "{:.0f}", False),
    ("duration", "benchmark duration (s)", "{:.1f}", False),
    ("request_throughput", "request throughput (req/s)", "{:.4f}", True),
    ("output_throughput", "output throughput (tok/s)", "{:.2f}", True),
    ("total_token_throughput", "total throughput (tok/s)", "{:.1f}", True),
    ("first_prefill_tok_s", "prefill tok/s of the first request (unloaded)", "{:.0f}", True),
    ("median_ttft_ms", "TTFT median (ms)", "{:,.0f}", False),
    ("p99_ttft_ms", "TTFT p99 (ms)", "{:,.0f}", False),
    ("median_tpot_ms", "TPOT median (ms)", "{:,.1f}", False),
    ("p99_tpot_ms", "TPOT p99 (ms)", "{:,.1f}", False),
    ("median_itl_ms", "ITL median (ms)", "{:,.1f}", False),
    ("p99_itl_ms", "ITL p99 (ms)", "{:,.1f}", False),
    ("median_e2el_ms", "end-to-end latency median (ms)", "{:,.0f}", False),
    ("kv_cache_tokens", "KV cache size reported (tokens)", "{:,.0f}", True),
    ("max_concurrency", "max concurrency reported (x max-model-len)", "{:.2f}", True),
    ("max_running", "most requests running at once (observed)", "{:.0f}", True),
    ("peak_kv_usage_pct", "peak KV cache usage (%)", "{:.0f}", None),
    ("preemptions", "preemptions", "{:.0f}", False),
]
# Ratios of these are not meaningful (counts that should be equal or zero).
_NO_RATIO = {"completed", "failed", "preemptions"}
# Left out of the chart: the inverse of request throughput, and a usage level.
_NOT_CHARTED = {"duration", "peak_kv_usage_pct"}


def flatten_side(side: dict[str, Any]) -> dict[str, Any]:
    """One flat row of figures for a side: benchmark + capacity + observed."""
    row = dict(side.get("bench") or {})
    capacity = side.get("capacity_log") or side.get("capacity_metrics") or {}
    row["kv_cache_tokens"] = capacity.get("kv_cache_tokens")
    row["max_concurrency"] = capacity.get("max_concurrency")
    row.update({k: v for k, v in (side.get("observed") or {}).items()})
    return row


def ratio(candidate: float | None, baseline: float | None) -> float | None:
    if candidate is None or baseline is None:
        return None
    if baseline == 0:
        return None
    return candidate / baseline


def compare(baseline: dict[str, Any], candidate: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the side-by-side table, with candidate/baseline ratios."""
    rows = []
    for key, label, fmt, higher_better in ROWS:
        b, c = baseline.get(key), candidate.get(key)
        if b is None and c is None:
            continue
        r = None if key in _NO_RATIO else ratio(c, b)
        better = None
        if r is not None and r != 1.0 and higher_better is not None:
            better = "candidate" if (r > 1.0) == higher_better else "baseline"
        rows.append({
            "key": key, "metric": label, "baseline": b, "candidate": c,
            "ratio": r, "higher_is_better": higher_better, "better": better,
            "format": fmt,
        })
    return rows


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def render_markdown(rows: list[dict[str, Any]], names: dict[str, str], notes: list[str] = ()) -> str:
    lines = [
        f"| metric | baseline: {names['baseline']} | candidate: {names['candidate']} | candidate / baseline |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        r = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        if row["better"] == "candidate":
            r += " (better)"
        elif row["better"] == "baseline":
            r += " (worse)"
        lines.append(
            f"| {row['metric']} | {_fmt(row['baseline'], row['format'])} | "
            f"{_fmt(row['candidate'], row['format'])} | {r} |"
        )
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"


def render_text(rows: list[dict[str, Any]], names: dict[str, str]) -> str:
    """The same table for a terminal: fixed-width columns."""
    head = ("metric", f"baseline ({names['baseline']})", f"candidate ({names['candidate']})", "cand/base")
    body = [
        (row["metric"], _fmt(row["baseline"], row["format"]), _fmt(row["candidate"], row["format"]),
         "-" if row["ratio"] is None else f"{row['ratio']:.2f}x")
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]
    out = [
        "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(head)),
        "  ".join("-" * w for w in widths),
    ]
    for r in body:
        out.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
    return "\n".join(out)


def plot_chart(rows: list[dict[str, Any]], title: str, path: str | Path) -> Path | None:
    """Horizontal bars of candidate/baseline per metric; 1.0 marks parity."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [r for r in rows if r["ratio"] is not None and r["key"] not in _NOT_CHARTED]
    if not shown:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.6))
    labels = [r["metric"] for r in shown][::-1]
    values = [r["ratio"] for r in shown][::-1]
    colors = ["#2a9d8f" if r["better"] == "candidate" else "#e76f51" if r["better"] == "baseline"
              else "#8d99ae" for r in shown][::-1]
    bars = ax.barh(labels, values, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    for bar, r in zip(bars, shown[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {r['ratio']:.2f}x  ({_fmt(r['baseline'], r['format'])} -> "
                f"{_fmt(r['candidate'], r['format'])})", va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.6)
    ax.set_xlabel("candidate / baseline  (green: candidate better, red: worse)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_outputs(out: Path, report: dict[str, Any], markdown: str, chart_title: str) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "loadtest.md").write_text(markdown)
    (out / "loadtest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    written = {"markdown": str(out / "loadtest.md"), "json": str(out / "loadtest.json")}
    png = plot_chart(report["rows"], chart_title, out / "loadtest.png")
    if png is not None:
        written["chart"] = str(png)
    return written


# ---------------------------------------------------------------- progress


_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - _T0:5.0f}s] {msg}", flush=True)


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def is_url(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def _kill_group(proc: subprocess.Popen | None, grace_s: float = 30.0) -> None:
    """Stop a process started with ``start_new_session``, and all it started.

    SIGTERM goes to the leader only: ``vllm serve`` then shuts its engine
    down in order (a SIGTERM to the whole group at once kills the engine
    under the API server, which logs a spurious EngineDeadError). Whatever
    is left in the process group after the grace period gets SIGKILL.
    """
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Server:
    """A server to benchmark: started here from a model folder, or attached by URL."""

    side: str
    target: str
    base_url: str = ""
    model_name: str = ""
    tokenizer: str | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    ready_s: float | None = None
    max_model_len: int | None = None
    command: list[str] = field(default_factory=list)

    def capacity_from_log(self) -> dict[str, Any] | None:
        if self.log_path is None or not self.log_path.exists():
            return None
        return parse_capacity_log(self.log_path.read_text(errors="replace"))

    def metrics_text(self) -> str | None:
        try:
            return http_get(self.base_url + "/metrics")
        except (OSError, urllib.error.URLError):
            return None


@contextlib.contextmanager
def started_server(side: str, target: str, args, out: Path) -> Iterator[Server]:
    """``vllm serve`` a model folder on 127.0.0.1 (or attach to a URL); stop it after."""
    if is_url(target):
        server = Server(side, target, base_url=target.rstrip("/").removesuffix("/v1"))
        models = json.loads(http_get(server.base_url + "/v1/models", timeout=10))["data"]
        name = getattr(args, f"{side}_name") or models[0]["id"]
        server.model_name = name
        card = next((m for m in models if m["id"] == name), {})
        root = card.get("root")
        server.max_model_len = card.get("max_model_len")
        server.tokenizer = args.tokenizer or (root if root and Path(root).exists() else None)
        say(f"{side}: attached to {server.base_url} (model {name})")
        yield server
        return

    folder = Path(target).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: --{side} {target}: not a URL and not a model folder with config.json")
    port = free_port()
    name = getattr(args, f"{side}_name") or folder.name
    log_path = out / f"{side}-server.log"
    cmd = vllm_command() + [
        "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", name,
        "--max-model-len", str(args.max_model_len), "--block-size", str(args.block_size),
        "--dtype", args.dtype, "--seed", str(args.seed),
        # Float32 logits on both sides (converted folders ask for them; the
        # baseline must pay the same head), as the main job serves.
        "--hf-overrides", json.dumps({"head_dtype": "float32"}),
    ]
    if not args.compiled:
        cmd.append("--enforce-eager")
    for extra in args.server_arg:
        cmd += shlex.split(extra)
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the normal multi-process server
    env["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_space)
    if args.cpu_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.cpu_threads_bind
    server = Server(side, target, base_url=f"http://127.0.0.1:{port}", model_name=name,
                    tokenizer=args.tokenizer or str(folder), log_path=log_path, command=cmd,
                    max_model_len=args.max_model_len)
    say(f"{side}: vllm serve {folder} on 127.0.0.1:{port} "
        f"(VLLM_CPU_KVCACHE_SPACE={args.kv_cache_space}; log {log_path})")
    with open(log_path, "w") as log:
        server.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True, cwd=str(ROOT))
    try:
        t0 = time.monotonic()
        last_note = t0
        while True:
            if server.proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{side}: vllm serve exited with {server.proc.returncode}:\n{tail}")
            try:
                if http_get(server.base_url + "/health", timeout=2) is not None:
                    break
            except (OSError, urllib.error.URLError):
                pass
            now = time.monotonic()
            if now - t0 > args.ready_timeout:
                raise RuntimeError(f"{side}: vllm serve not ready in {args.ready_timeout} s (log {log_path})")
            if now - last_note >= 15:
                say(f"{side}: waiting for the server ({now - t0:.0f} s)")
                last_note = now
            time.sleep(1)
        server.ready_s = time.monotonic() - t0
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            say(f"{side}: stopping the server (process group {server.proc.pid})")
        _kill_group(server.proc)


def warm_up(server: Server, timeout: float = 300.0) -> float:
    """One short completion, so first-request costs stay out of the benchmark."""
    body = json.dumps({"model": server.model_name, "prompt": "Hello, how are you?",
                       "max_tokens": 4, "temperature": 0.0}).encode()
    req = urllib.request.Request(server.base_url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        json.loads(r.read())
    return time.monotonic() - t0


class MetricsPoller(threading.Thread):
    """Samples /metrics every ``interval`` s: what really runs, and progress lines."""

    def __init__(self, server: Server, total: int, interval: float = 1.0, report_every: float = 30.0):
        super().__init__(daemon=True)
        self.server, self.total = server, total
        self.interval, self.report_every = interval, report_every
        self.stop_event = threading.Event()
        self.max_running = 0.0
        self.max_waiting = 0.0
        self.peak_kv = 0.0
        self.samples = 0
        self.start_counts: dict[str, float] = {}
        self.last_counts: dict[str, float] = {}

    _COUNTERS = {
        "done": "vllm:request_success_total",
        "preempted": "vllm:num_preemptions_total",
        "prompt": "vllm:prompt_tokens_total",
        "generated": "vllm:generation_tokens_total",
    }

    def _read(self) -> dict[str, float] | None:
        text = self.server.metrics_text()
        if text is None:
            return None
        s = parse_prometheus(text)
        values = {k: metric_sum(s, name) or 0.0 for k, name in self._COUNTERS.items()}
        values["running"] = metric_sum(s, "vllm:num_requests_running") or 0.0
        values["waiting"] = metric_sum(s, "vllm:num_requests_waiting") or 0.0
        values["kv"] = 100.0 * (metric_sum(s, "vllm:kv_cache_usage_perc") or 0.0)
        return values

    def run(self) -> None:
        first = self._read()
        if first is not None:
            self.start_counts = self.last_counts = first
        t0 = last_report = time.monotonic()
        while not self.stop_event.wait(self.interval):
            values = self._read()
            if values is None:
                continue
            self.samples += 1
            self.last_counts = values
            self.max_running = max(self.max_running, values["running"])
            self.max_waiting = max(self.max_waiting, values["waiting"])
            self.peak_kv = max(self.peak_kv, values["kv"])
            now = time.monotonic()
            if now - last_report >= self.report_every:
                last_report = now
                d = self.delta()
                say(f"{self.server.side}: {d['done']:.0f}/{self.total} done | running "
                    f"{values['running']:.0f} waiting {values['waiting']:.0f} | KV {values['kv']:.0f}% | "
                    f"prefilled {d['prompt']:,.0f} tok, generated {d['generated']:,.0f} tok | "
                    f"{now - t0:.0f} s")

    def delta(self) -> dict[str, float]:
        return {k: self.last_counts.get(k, 0.0) - self.start_counts.get(k, 0.0) for k in self._COUNTERS}

    def finish(self) -> dict[str, Any]:
        self.stop_event.set()
        self.join(timeout=10)
        final = self._read()
        if final is not None:
            self.last_counts = final
        d = self.delta()
        return {
            "max_running": self.max_running if self.samples else None,
            "max_waiting": self.max_waiting if self.samples else None,
            "peak_kv_usage_pct": self.peak_kv if self.samples else None,
            "preemptions": d["preempted"] if self.samples else None,
            "metrics_samples": self.samples,
        }


def bench_command(server: Server, args, result_dir: Path, filename: str) -> list[str]:
    ranges = json.dumps({"input": args.input_range, "output": args.output_range})
    cmd = vllm_command() + [
        "bench", "serve",
        "--backend", "vllm", "--base-url", server.base_url, "--endpoint", "/v1/completions",
        "--model", server.model_name, "--tokenizer", str(server.tokenizer),
        "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--random-range-ratio", ranges,
        "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
        "--ignore-eos", "--seed", str(args.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed",
        "--result-dir", str(result_dir), "--result-filename", filename,
        "--disable-tqdm",
    ]
    if args.max_concurrency:
        cmd += ["--max-concurrency", str(args.max_concurrency)]
    for extra in args.bench_arg:
        cmd += shlex.split(extra)
    return cmd


def run_side(side: str, target: str, args, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"target": target}
    with started_server(side, target, args, out) as server:
        if server.tokenizer is None:
            raise SystemExit(f"error: --{side} {target}: pass --tokenizer (a folder with the tokenizer)")
        result.update(base_url=server.base_url, model_name=server.model_name,
                      tokenizer=server.tokenizer, server_command=server.command,
                      ready_s=server.ready_s, attached=server.proc is None,
                      max_model_len=server.max_model_len)
        result["capacity_log"] = server.capacity_from_log()
        if server.log_path is not None:
            result["architecture"] = parse_architecture_log(server.log_path.read_text(errors="replace"))
        metrics = server.metrics_text()
        result["capacity_metrics"] = parse_cache_config_metrics(metrics) if metrics else None
        cap = result["capacity_log"] or result["capacity_metrics"] or {}
        ready = f"ready in {server.ready_s:.0f} s; " if server.ready_s else ""
        if result.get("architecture"):
            ready += f"{result['architecture']}; "
        say(f"{side}: {ready}KV cache {cap.get('kv_cache_tokens') or 0:,} tokens, max concurrency "
            f"{cap.get('max_concurrency') or 0:.2f}x at {server.max_model_len or 0:,} tokens per request")
        result["warmup_s"] = warm_up(server)
        say(f"{side}: warm-up request done in {result['warmup_s']:.1f} s")

        filename = f"{side}-bench.json"
        cmd = bench_command(server, args, out, filename)
        result["bench_command"] = cmd
        lo = round(args.input_len * (1 - args.input_range))
        hi = round(args.input_len * (1 + args.input_range))
        say(f"{side}: vllm bench serve: {args.num_prompts} prompts of {lo}-{hi} tokens, "
            f"{args.output_len} out, max concurrency {args.max_concurrency or 'none'}, "
            f"rate {args.request_rate} (log {out / f'{side}-bench.log'})")
        poller = MetricsPoller(server, args.num_prompts, report_every=args.progress_every)
        poller.start()
        t0 = time.monotonic()
        with open(out / f"{side}-bench.log", "w") as log:
            bench = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=str(ROOT))
            try:
                rc = bench.wait(timeout=args.bench_timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                _kill_group(bench, grace_s=10)
        result["bench_wall_s"] = time.monotonic() - t0
        result["observed"] = poller.finish()
        if rc is None:
            raise RuntimeError(f"{side}: vllm bench serve ran past --bench-timeout {args.bench_timeout} s")
        if rc != 0 or not (out / filename).exists():
            tail = (out / f"{side}-bench.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{side}: vllm bench serve failed (exit {rc}):\n{tail}")
        result["bench"] = load_bench_result(out / filename)
        b = result["bench"]
        say(f"{side}: done in {result['bench_wall_s']:.0f} s: {b['completed']} completed, "
            f"{b['failed']} failed, {b['output_throughput']:.2f} output tok/s, "
            f"most running at once {result['observed']['max_running'] or 0:.0f}")
    return result


# ---------------------------------------------------------------- main


def analytic_limit(candidate: str, max_model_len: int, block_size: int) -> float | None:
    """1 / (converted KV bytes per request / unconverted), steady state, if a converted folder."""
    cfg_path = Path(candidate) / "config.json"
    if is_url(candidate) or not cfg_path.is_file():
        return None
    sys.path.insert(0, str(ROOT))
    try:
        from vllm_lighttransfer.config import LightTransferConfig, kv_bytes_ratio

        cfg = LightTransferConfig.from_hf_config(json.loads(cfg_path.read_text()))
        return 1.0 / kv_bytes_ratio(cfg, max_model_len, block_size=block_size)
    except Exception:  # not a converted folder
        return None


# Named workloads. prefill-heavy: long prompts, short answers (RAG-like);
# decode-heavy: ~1K-token prompts and 4K-6K-token answers (o1-like reasoning,
# LightTransfer's strongest case: lazy layers keep a window however long the
# answer grows), more requests at once than the unconverted model's KV cache
# holds at full length (SmolLM2, 1 GiB of KV: 5.7 full-length requests).
SCENARIOS: dict[str, dict[str, Any]] = {
    "prefill-heavy": dict(doc="prompts 4096-6144, 128 out, 16 requests at once",
                          input_len=5120, input_range=0.2, output_len=128, output_range=0.0,
                          num_prompts=16, max_concurrency=16),
    "decode-heavy": dict(doc="prompts ~1024, 4096-6144 out, 12 requests at once",
                         input_len=1024, input_range=0.1, output_len=5120, output_range=0.2,
                         num_prompts=12, max_concurrency=12),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (bench/loadtest.py) and bench/LOADTEST.md.",
    )
    ap.add_argument("--baseline", help="unconverted model: folder or http://host:port")
    ap.add_argument("--candidate", help="converted model: folder or http://host:port")
    ap.add_argument("--baseline-name", default=None, help="served model name (default: folder name / first id)")
    ap.add_argument("--candidate-name", default=None)
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder for both benchmarks (default: the baseline folder)")
    w = ap.add_argument_group("workload (vllm bench serve, random dataset)")
    w.add_argument("--scenario", choices=sorted(SCENARIOS), default=None,
                   help="a named workload; its values replace the defaults of the flags below, "
                        "flags given explicitly still win: " + "; ".join(
                            f"{k}: {v['doc']}" for k, v in sorted(SCENARIOS.items())))
    w.add_argument("--input-len", type=int, default=5120, help="mean prompt tokens (default 5120)")
    w.add_argument("--input-range", type=float, default=0.2,
                   help="prompts are input-len*(1 +- range) tokens (default 0.2: 4096-6144)")
    w.add_argument("--output-len", type=int, default=128, help="output tokens, eos ignored (default 128)")
    w.add_argument("--output-range", type=float, default=0.0)
    w.add_argument("--num-prompts", type=int, default=16, help="requests per side (default 16)")
    w.add_argument("--max-concurrency", type=int, default=16,
                   help="most requests in flight from the client (default 16; 0: no limit)")
    w.add_argument("--request-rate", default="inf", help="requests/s, Poisson (default inf: all at once)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--bench-arg", action="append", default=[],
                   help="extra flags for `vllm bench serve`, e.g. --bench-arg='--num-warmups 1' (repeatable)")
    s = ap.add_argument_group("servers started here (identical for both)")
    s.add_argument("--kv-cache-space", type=int, default=1,
                   help="VLLM_CPU_KVCACHE_SPACE in GiB (default 1; CPU builds only)")
    s.add_argument("--cpu-threads-bind", default=None, metavar="CPUS",
                   help="VLLM_CPU_OMP_THREADS_BIND for both servers, e.g. 0-1 to give the engine "
                        "both cores of a 2-core machine (default: vLLM's choice, which on 2 cores "
                        "binds the engine to 1 and leaves 1 to the API server)")
    s.add_argument("--max-model-len", type=int, default=8192)
    s.add_argument("--block-size", type=int, default=32)
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--compiled", action="store_true",
                   help="serve in vLLM's compiled mode (default: --enforce-eager, the main job's CPU "
                        "configuration; see scripts/serve_default.sh)")
    s.add_argument("--server-arg", action="append", default=[],
                   help="extra flags for both `vllm serve`s, e.g. --server-arg=--enforce-eager (repeatable)")
    s.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds per benchmark (default 1800)")
    ap.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    ap.add_argument("--out", default=None, help="output folder (default results/loadtest-<time>)")
    ap.add_argument("--render", default=None, metavar="LOADTEST_JSON",
                    help="no run: rebuild loadtest.md/.png from an earlier loadtest.json")
    return ap


def apply_scenario(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """Scenario values for every workload flag the command line did not set."""
    if not args.scenario:
        return
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for key, value in SCENARIOS[args.scenario].items():
        if key != "doc" and f"--{key.replace('_', '-')}" not in given:
            setattr(args, key, value)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    apply_scenario(ap, args, list(argv if argv is not None else sys.argv[1:]))
    if args.render:
        return render_only(Path(args.render))
    if not (args.baseline and args.candidate):
        build_parser().error("--baseline and --candidate are required (or --render)")
    out = Path(args.out or ROOT / "results" / time.strftime("loadtest-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None and not is_url(args.baseline):
        args.tokenizer = str(Path(args.baseline).expanduser().resolve())  # same prompts for both

    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so every server is stopped.
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)

    command = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])
    say(f"load test -> {out}")
    t_start = time.monotonic()
    sides: dict[str, dict[str, Any]] = {}
    try:
        for side in SIDES:
            sides[side] = run_side(side, getattr(args, side), args, out)
    except KeyboardInterrupt:
        say("interrupted; servers stopped")
        return 130
    except (RuntimeError, OSError) as exc:  # OSError: an HTTP error from a server
        say(f"error: {exc}")
        return 1
    total_s = time.monotonic() - t_start
    lo = round(args.input_len * (1 - args.input_range))
    hi = round(args.input_len * (1 + args.input_range))
    report = {
        "command": command, "args": vars(args),
        "workload": (f"random prompts of {lo}-{hi} tokens, {args.output_len} output tokens (eos ignored), "
                     f"{args.num_prompts} prompts, max concurrency {args.max_concurrency or 'none'}, "
                     f"request rate {args.request_rate}, seed {args.seed}"),
        "servers": servers_note(args, sides),
        "total_wall_s": total_s,
        "analytic_kv_limit": analytic_limit(args.candidate, args.max_model_len, args.block_size),
        "sides": sides,
        "raw_results": {s: str(out / f"{s}-bench.json") for s in SIDES},
    }
    return finish_report(report, out)


def servers_note(args, sides: dict[str, dict[str, Any]]) -> str:
    """How the servers ran: our identical flags, or attached URLs (their own flags)."""
    started = (f"--max-model-len {args.max_model_len} --block-size {args.block_size} --dtype {args.dtype}"
               + " --hf-overrides head_dtype=float32" + ("" if args.compiled else " --enforce-eager")
               + (" " + " ".join(args.server_arg) if args.server_arg else "")
               + f", VLLM_CPU_KVCACHE_SPACE={args.kv_cache_space}"
               + (f", VLLM_CPU_OMP_THREADS_BIND={args.cpu_threads_bind}" if args.cpu_threads_bind
                  else ", engine threads: vLLM's default binding"))
    attached = [s for s in SIDES if sides[s].get("attached")]
    if not attached:
        return started
    parts = [f"{s} attached at {sides[s]['base_url']} (max-model-len {sides[s].get('max_model_len')}, "
             f"its own flags)" for s in attached]
    if len(attached) < len(SIDES):
        parts.append(f"{'candidate' if attached == ['baseline'] else 'baseline'} started with {started}")
    return "; ".join(parts)


def finish_report(report: dict[str, Any], out: Path) -> int:
    """Table, notes, Markdown/JSON/PNG from a report's sides; prints the table."""
    sides = report["sides"]
    rows = report["rows"] = compare(flatten_side(sides["baseline"]), flatten_side(sides["candidate"]))
    names = {side: sides[side]["model_name"] for side in SIDES}
    args = report["args"]
    archs = ", ".join(f"{s} {sides[s]['architecture']}" for s in SIDES if sides[s].get("architecture"))
    notes = [f"Workload: {report['workload']}.",
             f"Servers: {report['servers']}; run one after the other" + (f" ({archs})." if archs else "."),
             f"Total wall time: {report['total_wall_s'] / 60:.1f} min."]
    if report.get("analytic_kv_limit"):
        notes.append(f"Analytic KV capacity limit at {args['max_model_len']:,} tokens "
                     f"(block {args['block_size']}): {report['analytic_kv_limit']:.2f}x.")
    failed = sum(int(sides[s]["bench"].get("failed") or 0) for s in SIDES)
    report["failed"] = failed
    report["scenario"] = args.get("scenario")
    out_row = next((r for r in rows if r.get("key") == "output_throughput"), None)
    report["output_throughput_ratio"] = out_row.get("ratio") if out_row else None
    if failed:
        notes.append(f"FAILED REQUESTS: {failed}; first errors: "
                     + "; ".join(str(e)[:200] for s in SIDES for e in sides[s]["bench"]["errors"]))
    report["notes"] = notes
    markdown = render_markdown(rows, names, notes)
    title = f"{names['candidate']} vs {names['baseline']}: {report['workload']}"
    written = write_outputs(out, report, markdown, "\n".join(_wrap(title, 95)))
    print()
    print(render_text(rows, names))
    print()
    for note in notes:
        print(note)
    say("wrote " + ", ".join(written.values()))
    return 1 if failed else 0


def render_only(path: Path) -> int:
    """Rebuild table and chart from a loadtest.json (and its raw results, if still there)."""
    report = json.loads(path.read_text())
    for side, raw in (report.get("raw_results") or {}).items():
        if Path(raw).is_file():
            report["sides"][side]["bench"] = load_bench_result(raw)
    return finish_report(report, path.parent)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)


if __name__ == "__main__":
    sys.exit(main())
