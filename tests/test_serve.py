"""A real `vllm serve` of a converted tiny model, driven over HTTP by the openai client.

One server is started for the module (127.0.0.1, a free port), stopped by PID
at the end. The tiny model's WordLevel tokenizer maps "w17" to one token, so
token ids from the API can be checked against the plain-PyTorch reference.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import lt_config, random_prompts
from vllm_lighttransfer.reference import ReferenceHybridModel

pytestmark = pytest.mark.serve

SINK, WINDOW, LAZY = 4, 24, [1, 2]
MAX_MODEL_LEN = 512


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_command() -> list[str]:
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


@pytest.fixture(scope="module")
def server(convert, tmp_path_factory):
    model = convert(LAZY, SINK, WINDOW)
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the normal multi-process server
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    cmd = _vllm_command() + [
        "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny-lt",
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
        "--block-size", "32", "--enforce-eager", "--seed", "0",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready in 240 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield {"base": base, "model": model, "log": log_path, "pid": proc.pid}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_llama, server):
    return ReferenceHybridModel.from_pretrained(str(tiny_llama), lt_config(server["model"]))


def words(ids):
    # Token id i >= 4 is the word "w{i-4}" in the tiny tokenizer.
    return " ".join(f"w{i - 4}" for i in ids)


def test_server_resolved_our_architecture(server):
    log = server["log"].read_text()
    assert "Resolved architecture: LightTransferLlamaForCausalLM" in log
    assert "Maximum concurrency" in log


def test_completion_longer_than_window_matches_reference(client, reference):
    prompt_ids = random_prompts([150], seed=11)[0]  # 150 tokens >> sink + window = 28
    resp = client.completions.create(
        model="tiny-lt", prompt=words(prompt_ids), max_tokens=12, temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = resp.choices[0]
    assert resp.usage.prompt_tokens == 150
    assert choice.prompt_token_ids == prompt_ids
    assert choice.token_ids == reference.greedy(prompt_ids, 12)
    assert len(choice.text.split()) == 12


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model="tiny-lt", messages=[{"role": "user", "content": "w1 w2 w3"}],
        max_tokens=5, temperature=0.0, extra_body={"ignore_eos": True},
    )
    assert resp.choices[0].message.role == "assistant"
    assert len(resp.choices[0].message.content.split()) == 5
    assert resp.usage.completion_tokens == 5


def test_streaming_equals_non_streaming(client):
    prompt = words(random_prompts([60], seed=12)[0])
    full = client.completions.create(model="tiny-lt", prompt=prompt, max_tokens=10, temperature=0.0,
                                     extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="tiny-lt", prompt=prompt, max_tokens=10,
                                            temperature=0.0, stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text


def test_concurrent_requests(client, reference):
    prompts = random_prompts([40, 90, 130, 170, 210, 250], seed=13)

    def run(ids):
        r = client.completions.create(model="tiny-lt", prompt=words(ids), max_tokens=8, temperature=0.0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        return r.choices[0].token_ids

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(run, prompts))
    assert got == [reference.greedy(p, 8) for p in prompts]


def test_bad_requests_are_4xx_and_server_stays_up(client, server):
    import openai

    too_long = words(random_prompts([MAX_MODEL_LEN + 10], seed=14)[0])
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-lt", prompt=too_long, max_tokens=4)
    assert err.value.status_code == 400
    assert "maximum context length" in str(err.value) or "max_model_len" in str(err.value) or "too long" in str(err.value)

    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-lt", prompt="w1", max_tokens=4, temperature=-1.0)
    assert err.value.status_code == 400
    assert "temperature" in str(err.value)

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="w1", max_tokens=4)

    with urllib.request.urlopen(server["base"] + "/health", timeout=5) as r:
        assert r.status == 200
    ok = client.completions.create(model="tiny-lt", prompt="w1 w2", max_tokens=2)
    assert ok.choices[0].text


def test_models_endpoint(server):
    with urllib.request.urlopen(server["base"] + "/v1/models", timeout=5) as r:
        data = json.loads(r.read())
    assert [m["id"] for m in data["data"]] == ["tiny-lt"]
