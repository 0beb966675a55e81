"""The main job as a user runs it: ``scripts/serve_default.sh``, real SmolLM2, right answers.

The server is started by the main job's own script, so it runs exactly the
main job's flags (whatever they are: compiled or eager, dtype, block size),
on the real embedded model converted as the main job converts it (the
converter's defaults: half of the (layer, KV head) pairs streaming, chosen
on the retrieval calibration), read from the shipped preset that records
that choice (``configs/smollm2-135m-instruct-heads.json``: seconds instead
of minutes of scoring).
Its greedy chat answers to three short questions must be right (Paris; red,
blue and yellow; 4) and be transformers' greedy answers on the same folder
(float32, the plain-PyTorch reference attention on the streaming heads) up
to near-ties: the first answer token exactly (issue 9: vLLM-CPU's compiled
bfloat16 default answered "L'Étoile, la Marseillaise, ..." to the first
question, a tie at the first answer token), every later token within
``TIE_LOGITS`` of the reference's best logit given the same served prefix
(teacher-forced, so one flipped tie does not make the rest incomparable).

Why not word for word: served in bfloat16, many tokens are a near-tie away
from another wording, and any change in a kernel's summation order can pick
the other one. The decode kernel of issue 10 turned "The primary colors
are: Red, Blue, and Yellow." into "The primary colors are:\n\nRed (R)..."
five tokens in; per-KV-head streaming (issue 13) turned "The answer to this
classic math problem is 4." into "The answer is 4." at a 0.024-logit tie.
All are right; none is the float32 reference's exact rounding
(docs/bf16_logits.md).
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
# Largest logit gap (float32 reference) a served greedy token may have to the
# reference's best at the same prefix: bfloat16 rounding, not a wrong model.
TIE_LOGITS = 0.25


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as the main job converts it (its preset: no scoring, seconds)."""
    from vllm_lighttransfer.convert.sources import smollm2_gguf

    out = tmp_path_factory.mktemp("main-job") / "smollm2-lighttransfer"
    subprocess.run(
        [str(Path(sys.executable).with_name("lighttransfer")), "convert", str(smollm2_gguf()), str(out),
         "--preset", "smollm2-135m-instruct-heads", "--no-progress"],
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


def reference_gaps(folder: Path, answers: list[list[int]]) -> tuple[list[list[float]], list[int]]:
    """Teacher-forced float32 reference on each served answer.

    Returns, per answer, ``max(logits) - logits[served token]`` at every
    answer position given the same prefix (0 where the served token is the
    reference's argmax), and the reference's own greedy first token.
    """
    import torch
    from transformers import AutoTokenizer

    from vllm_lighttransfer.config import LightTransferConfig
    from vllm_lighttransfer.reference import ReferenceHybridModel

    tok = AutoTokenizer.from_pretrained(folder)
    cfg = LightTransferConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    ref = ReferenceHybridModel.from_pretrained(str(folder), cfg, dtype=torch.float32)
    gaps, firsts = [], []
    for q, ans in zip(QUESTIONS, answers):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        logits = ref.logits(ids + ans)[len(ids) - 1 : len(ids) - 1 + len(ans)]
        gaps.append([(row.max() - row[t]).item() for row, t in zip(logits, ans)])
        firsts.append(int(logits[0].argmax()))
    return gaps, firsts


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
    served, tokens = [], []
    for q in QUESTIONS:
        reply = client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": q}],
            max_tokens=MAX_TOKENS, temperature=0.0, logprobs=True,
            extra_body={"return_tokens_as_token_ids": True},  # "token_id:N"
        )
        choice = reply.choices[0]
        served.append(choice.message.content)
        tokens.append([int(t.token.split(":", 1)[1]) for t in choice.logprobs.content])
    # Right answers.
    assert "Paris" in served[0], served
    assert all(c in served[1].lower() for c in ("red", "blue", "yellow")), served
    assert "4" in served[2], served
    gaps, firsts = reference_gaps(converted, tokens)
    # The first answer token is the float32 reference's: where issue 9's
    # tie broke the wrong way ("L'Étoile" for "The capital").
    assert [t[0] for t in tokens] == firsts, (served, firsts)
    # Every later token is the reference's greedy choice given the same
    # prefix, up to a near-tie: bfloat16 serving moves logits by a few
    # hundredths ("The answer is 4." vs "The answer to this ... is 4.": " to"
    # 27.445, " is" 27.421 in float32), a wrong model by whole units.
    worst = max(max(g) for g in gaps)
    assert worst < TIE_LOGITS, (served, [[round(x, 3) for x in g] for g in gaps])
