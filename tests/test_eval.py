"""The quality evaluation itself: prompt construction, answer scoring, one tiny run.

The long run (bench/eval_quality.py on SmolLM2) is not a test; these check
that its probes are what they claim (exact length, needle at the asked
depth, the answer recoverable), that scoring is strict, and that the runner
and report work end to end on the tiny random model through vLLM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_lighttransfer.eval import prompts as P
from vllm_lighttransfer.eval.runner import Variant, VariantResult, plan_variants
from vllm_lighttransfer.eval.scoring import (
    accuracy_table,
    baseline_comparison,
    first_number,
    first_word,
    is_correct,
    perplexity,
    perplexity_rows,
    token_nlls,
    wilson_interval,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


class SentenceTokenizer:
    """Whitespace words -> ids, just enough of a tokenizer for prompts.py."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: dict[int, str] = {}
        self.chat_template = None

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.vocab)
                self.words[self.vocab[w]] = w
            ids.append(self.vocab[w])
        return {"input_ids": ids}

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("length", [300, 517, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_probe_exact_length_and_depth(tiny_tokenizer, length, depth):
    builder = P.PromptBuilder(tiny_tokenizer)
    filler = P.FillerStream.repeated(tiny_tokenizer, "w1 w2 w3 w4 w5 w6 w7", length)
    probe = builder.build(
        "passkey", length, depth, 0, filler, intro="w10 w11", needle="w20 w21 w22",
        question="w30 w31", answer_prefix="w40", answer="12345",
    )
    assert len(probe.token_ids) == probe.length == length
    # No sentence boundaries in this filler: the cut is exact.
    assert probe.needle_start - probe.filler_start == round(depth * probe.filler_tokens)
    assert abs(probe.actual_depth - depth) <= 0.5 / probe.filler_tokens + 1e-9
    needle = tuple(tiny_tokenizer("w20 w21 w22", add_special_tokens=False)["input_ids"])
    assert probe.token_ids[probe.needle_start : probe.needle_start + len(needle)] == needle
    # Chat template around the user message, question and answer prefix at the end.
    assert list(probe.token_ids[: len(builder.head)]) == builder.head
    tail = tiny_tokenizer("w30 w31", add_special_tokens=False)["input_ids"] + builder.tail
    tail += tiny_tokenizer("w40", add_special_tokens=False)["input_ids"]
    assert list(probe.token_ids[-len(tail) :]) == tail
    # Every filler token is there exactly once, around the needle.
    assert filler_of(probe) == filler.ids[: probe.filler_tokens]


def test_needle_snaps_to_sentence_boundary():
    tok = SentenceTokenizer()
    builder = P.PromptBuilder(tok, snap_tokens=4)
    # Sentences of 5 words: boundaries every 5 tokens.
    filler = P.FillerStream.repeated(tok, "a b c d e. " * 3, 400)
    assert filler.boundaries[:4] == [0, 5, 10, 15]
    probe = builder.build("needle", 200, 0.5, 0, filler, "intro", "the key is 42.", "q?", "ans", "42")
    assert len(probe.token_ids) == 200
    assert (probe.needle_start - probe.filler_start) % 5 == 0  # starts a sentence
    assert abs(probe.actual_depth - 0.5) <= 4 / probe.filler_tokens


def test_builder_rejects_impossible_requests(tiny_tokenizer):
    builder = P.PromptBuilder(tiny_tokenizer)
    filler = P.FillerStream.repeated(tiny_tokenizer, "w1 w2", 50)
    with pytest.raises(ValueError, match="too short"):
        builder.build("passkey", 5, 0.5, 0, filler, "w1 " * 10, "w2", "w3", "w4", "1")
    with pytest.raises(ValueError, match="filler tokens"):
        builder.build("passkey", 500, 0.5, 0, filler, "w1", "w2", "w3", "w4", "1")
    with pytest.raises(ValueError, match="depth"):
        builder.build("passkey", 40, 1.5, 0, filler, "w1", "w2", "w3", "w4", "1")


def test_build_probes_grid_and_keys(tiny_tokenizer):
    essays = list(range(10, 400)) * 300  # token ids of the tiny vocabulary
    probes = P.build_probes(
        tiny_tokenizer, ["passkey", "needle"], {256: [0.1, 0.9], 512: [0.5]},
        samples={256: 2, 512: 1}, seed=3, essays=essays,
    )
    assert len(probes) == 2 * (2 * 2 + 1)
    assert {(p.task, p.length, p.depth, p.sample) for p in probes} == {
        (t, 256, d, s) for t in ("passkey", "needle") for d in (0.1, 0.9) for s in (0, 1)
    } | {(t, 512, 0.5, 0) for t in ("passkey", "needle")}
    for p in probes:
        assert len(p.token_ids) == p.length
        assert len(p.answer) == 5 and p.answer.isdigit()
    # Deterministic keys, different across samples.
    again = P.build_probes(tiny_tokenizer, ["passkey"], {256: [0.1]}, samples=2, seed=3, essays=essays)
    assert [p.answer for p in again] == [p.answer for p in probes if p.task == "passkey"][:2]
    assert again[0].answer != again[1].answer
    # Needle haystacks come from held-out text, past the calibration prompts.
    for p in (p for p in probes if p.task == "needle"):
        assert filler_of(p) == P.held_out(essays, P.HAYSTACK_OFFSET, p.filler_tokens)


def test_needle_kinds_alternate_numbers_and_words():
    tok = SentenceTokenizer()
    essays = tok(" ".join(f"e{i}." for i in range(3000)))["input_ids"]
    probes = P.build_probes(tok, ["passkey", "needle"], {300: [0.2, 0.7]}, samples=4, seed=5,
                            essays=essays, haystack_offset=0, kinds=P.KINDS)
    assert len(probes) == 2 * 2 * 4
    for p in probes:
        assert p.kind == P.KINDS[p.sample % 2]  # 2 numbers and 2 words per cell
        needle = tok.decode(p.token_ids[p.needle_start : p.needle_start + p.needle_tokens])
        assert p.answer in needle.split() or p.answer + "." in needle.split()
        if p.kind == "number":
            assert len(p.answer) == 5 and p.answer.isdigit()
        else:
            assert p.answer in P.WORDS
        text = tok.decode(p.token_ids)
        if p.task == "needle":  # the question names what is hidden
            assert f"secret {p.kind} of the city" in text.split("?")[0].rsplit("What is", 1)[1]
    cells = {}
    for p in probes:
        cells.setdefault((p.task, p.depth), []).append(p.kind)
    assert all(sorted(k) == ["number", "number", "word", "word"] for k in cells.values())
    words = [p.answer for p in probes if p.kind == "word"]
    assert len(set(words)) > 1  # keys vary across samples
    with pytest.raises(ValueError, match="kind"):
        P.build_probes(tok, ["passkey"], {300: [0.5]}, kinds=("emoji",), essays=essays)


def filler_of(probe: P.Probe) -> list[int]:
    """The probe's filler tokens, needle removed."""
    before = list(probe.token_ids[probe.filler_start : probe.needle_start])
    after_start = probe.needle_start + probe.needle_tokens
    return before + list(probe.token_ids[after_start : after_start + probe.filler_tokens - len(before)])


def test_perplexity_prompts_are_held_out():
    essays = list(range(200_000))
    chunks = P.perplexity_prompts(None, 100, 3, essays)
    assert [len(c) for c in chunks] == [100, 100, 100]
    assert chunks[0][0] == P.PERPLEXITY_OFFSET and chunks[2][-1] == P.PERPLEXITY_OFFSET + 299
    assert P.PERPLEXITY_OFFSET >= P.HAYSTACK_OFFSET + 8192  # no overlap with haystacks
    short = list(range(1000))
    assert P.perplexity_prompts(None, 100, 2, short)[-1][-1] == 999  # as late as possible


@pytest.mark.skipif(
    not (ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1-hf" / "tokenizer.json").exists(),
    reason="SmolLM2 not dequantized locally (bench/eval_quality.py does it)",
)
def test_real_probes_smollm2():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1-hf"))
    probes = P.build_probes(tok, ["passkey", "needle"], {2048: [0.1, 0.5, 0.9]}, samples=1)
    for p in probes:
        assert len(p.token_ids) == 2048
        assert abs(p.actual_depth - p.depth) <= 24 / p.filler_tokens
        needle = tok.decode(p.token_ids[p.needle_start : p.needle_start + p.needle_tokens])
        assert p.answer in needle
        text = tok.decode(p.token_ids)
        assert text.startswith("<|im_start|>system")
        assert text.endswith("assistant\n" + ("The pass key is" if p.task == "passkey" else
                                              text.rsplit("\n", 1)[-1]))


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "text, ok",
    [
        (" 71432.", True),
        ("71432", True),
        (" 71,432. Remember it.", True),
        (" 71432 is the pass key.", True),
        (" 714321.", False),  # a longer number is wrong
        (" 7143.", False),
        (" 1. 71432", False),  # the first number counts
        (" the key to success", False),
        ("", False),
    ],
)
def test_is_correct(text, ok):
    assert is_correct(text, "71432") is ok


@pytest.mark.parametrize(
    "text, ok",
    [
        (" marigold.", True),
        (" Marigold", True),
        (" 'marigold' is the word", True),
        ("\n**marigold**", True),
        (" marigolds.", False),  # a longer word is wrong
        (" the marigold", False),  # the first word counts
        (" 12345", False),
        ("", False),
    ],
)
def test_is_correct_word(text, ok):
    assert is_correct(text, "marigold", "word") is ok


# Newcombe (1998), "Two-sided confidence intervals for the single proportion",
# Statistics in Medicine 17:857-872, Table I, method 3 (Wilson score, no
# continuity correction), and the textbook 0/10, 5/10, 10/10 values.
WILSON = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
]


@pytest.mark.parametrize("right, total, lo, hi", WILSON)
def test_wilson_interval_known_values(right, total, lo, hi):
    got = wilson_interval(right, total)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing measured: anything goes
    lo, hi = wilson_interval(4, 8)
    assert lo == pytest.approx(1 - hi)  # symmetric at 50%
    # Narrower with more probes, always inside [0, 1] and around the estimate.
    widths = [wilson_interval(n // 2, n)[1] - wilson_interval(n // 2, n)[0] for n in (4, 16, 64)]
    assert widths == sorted(widths, reverse=True)
    for r, n in [(0, 4), (1, 4), (3, 4), (4, 4)]:
        lo, hi = wilson_interval(r, n)
        assert 0.0 <= lo <= r / n <= hi <= 1.0
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_baseline_comparison_counts_what_full_knew():
    def rec(variant, sample, correct):
        return {"variant": variant, "task": "passkey", "length": 2048, "depth": 0.5,
                "sample": sample, "correct": correct}

    records = [rec("full", s, c) for s, c in enumerate([True, True, True, False])]
    records += [rec("x", s, c) for s, c in enumerate([True, False, True, True])]
    records += [rec("y", 0, True)]  # ran one probe only
    cmp = baseline_comparison(records, "x")
    assert cmp == {"probes": 4, "baseline_right": 3, "kept": 2, "gained": 1, "delta_points": 0.0}
    assert baseline_comparison(records, "y")["probes"] == 1
    assert baseline_comparison(records, "y")["delta_points"] == 0.0
    assert baseline_comparison(records, "none")["delta_points"] is None


def test_first_number():
    assert first_number("abc 12,345,678 x") == "12345678"
    assert first_number("no digits") is None


class _Logprob:
    def __init__(self, v):
        self.logprob = v


def test_token_nlls_and_perplexity():
    ids = [5, 6, 7]
    plp = [None, {6: _Logprob(-1.0), 9: _Logprob(-0.5)}, {7: -2.0}]
    assert token_nlls(plp, ids) == [1.0, 2.0]
    assert perplexity([1.0, 2.0]) == pytest.approx(math.exp(1.5))
    with pytest.raises(ValueError):
        token_nlls(plp, ids[:2])
    rows = perplexity_rows({"full": [[1.0, 1.0, 1.0]], "x": [[1.0, 1.0, 2.0]]}, "full", far_from=3)
    by = {r["variant"]: r for r in rows}
    assert by["full"]["ppl_ratio"] == 1.0
    assert by["x"]["ppl_ratio"] == pytest.approx(math.exp(4 / 3 - 1))
    # far_from=3: tokens at positions >= 3, i.e. the NLLs from index 2 on.
    assert by["x"]["ppl_far_ratio"] == pytest.approx(math.exp(1.0))
    assert by["x"]["far_tokens"] == 1
    assert by["x"]["ppl_near_ratio"] == 1.0


def test_accuracy_table():
    recs = [
        {"variant": "a", "task": "passkey", "length": 2048, "depth": 0.1, "correct": True},
        {"variant": "a", "task": "passkey", "length": 2048, "depth": 0.5, "correct": False},
        {"variant": "a", "task": "needle", "length": 4096, "depth": 0.5, "correct": True},
    ]
    t = accuracy_table(recs)["a"]
    assert t["overall"] == (2, 3)
    assert t["cells"][("passkey", 2048)] == (1, 2)
    assert t["tasks"]["needle"] == (1, 1)
    assert t["grid"][("passkey", 2048, 0.5)] == (0, 1)
    assert t["kinds"] == {"number": (2, 3)}  # records without a kind are numbers
    recs.append({"variant": "a", "task": "needle", "length": 4096, "depth": 0.5,
                 "correct": False, "kind": "word"})
    assert accuracy_table(recs)["a"]["kinds"] == {"number": (2, 3), "word": (0, 1)}


def test_plan_variants():
    # 8 layers, layer i scores i/10 on both prompts: laziest are the highest.
    per_prompt = [[i / 10 for i in range(8)]] * 2
    vs = {v.name: v for v in plan_variants(per_prompt, [0.25, 0.5], [0.5], seed=1)}
    assert list(vs) == ["full", "score-25", "score-50", "random-50", "least-50", "stream-all"]
    assert vs["full"].lazy_layers is None
    assert vs["score-25"].lazy_layers == (6, 7)
    assert vs["score-50"].lazy_layers == (4, 5, 6, 7)
    assert vs["least-50"].lazy_layers == (0, 1, 2, 3)
    assert len(vs["random-50"].lazy_layers) == 4
    assert vs["stream-all"].lazy_layers == tuple(range(8))
    again = {v.name: v for v in plan_variants(per_prompt, [0.25, 0.5], [0.5], seed=1)}
    assert again["random-50"] == vs["random-50"]
    # Task-calibrated scores: layer 7 is the least lazy on retrieval prompts.
    task = [[0.9, 0.9, 0.9, 0.9, 0.95, 0.95, 0.95, 0.1]]
    vs = plan_variants(per_prompt, [0.5], [], task_per_prompt=task, task_fractions=[0.5],
                       stream_all=False)
    assert [v.name for v in vs] == ["full", "score-50", "task-50"]
    assert vs[-1].lazy_layers == (0, 4, 5, 6)


def test_plan_variants_per_kv_head():
    # 4 layers x 2 KV heads; layer scores are the KV-head means.
    essay_heads = [[[0.1, 0.2], [0.5, 0.6], [0.9, 0.3], [0.8, 0.95]]] * 2
    retrieval_heads = [[[0.9, 0.1], [0.95, 0.2], [0.3, 0.85], [0.99, 0.4]]]
    per_prompt = [[sum(h) / 2 for h in row] for row in essay_heads]
    vs = {v.name: v for v in plan_variants(
        per_prompt, [0.5], [], stream_all=False,
        head_per_prompt=retrieval_heads, head_fractions=[0.25, 0.5, 0.75],
        essay_head_per_prompt=essay_heads, head_essay_fractions=[0.5],
    )}
    assert list(vs) == ["full", "score-50", "head-25", "head-50", "head-75", "head-essay-50"]
    # Per layer: layers 2 and 3 (means 0.6, 0.875); per head the laziest pairs.
    assert vs["score-50"].lazy_layers == (2, 3) and vs["score-50"].streaming_kv_heads is None
    assert vs["head-50"].streaming_kv_heads == ((0,), (0,), (1,), (0,))
    assert vs["head-25"].streaming_kv_heads == ((), (0,), (), (0,))
    assert vs["head-essay-50"].streaming_kv_heads == ((), (1,), (0,), (0, 1))
    for name, f in (("head-25", 0.25), ("head-50", 0.5), ("head-75", 0.75), ("head-essay-50", 0.5)):
        v = vs[name]
        assert v.lazy_layers == () and v.fraction == f
        assert v.streaming_pairs(2) == round(8 * f)
    # Same fraction of (layer, KV head) pairs as the per-layer variant.
    assert vs["score-50"].streaming_pairs(2) == vs["head-50"].streaming_pairs(2) == 4
    # Round trip through the raw files --resume reads.
    for v in vs.values():
        res = VariantResult(v)
        assert VariantResult.from_dict(json.loads(json.dumps(res.to_dict()))).variant == v


def _eval_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_quality", ROOT / "bench" / "eval_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_head_flags_and_resume_key():
    mod = _eval_main()
    args = mod.build_parser().parse_args([])
    assert args.head_fractions == [] and args.head_essay_fractions == []  # runs unchanged
    args = mod.build_parser().parse_args(["--head-fractions", "0.25,0.5",
                                          "--head-essay-fractions", "0.5"])
    assert args.head_fractions == [0.25, 0.5] and args.head_essay_fractions == [0.5]
    settings = {"model": "m", "lengths": [96], "longest_variants": ["full"], "num_layers": 4,
                "num_kv_heads": 2, "base_architecture": "LlamaForCausalLM"}
    probes = [SimpleNamespace(length=96)]  # the key reads lengths only
    layer = Variant("score-50", "score", 0.5, (1, 3))
    head = Variant("head-50", "head", 0.5, (), ((0,), (1,), (0,), (1,)))
    # Layer variants keep the key of earlier runs (model shape and heads not in it).
    assert mod.variant_key(settings, probes, layer) == {
        "settings": {"model": "m", "lengths": [96]}, "lengths": [96],
        "lazy_layers": [1, 3], "probes": 1,
    }
    other = Variant("head-50", "head", 0.5, (), ((1,), (1,), (0,), (1,)))
    assert mod.variant_key(settings, probes, head)["streaming_kv_heads"] == [[0], [1], [0], [1]]
    assert mod.variant_key(settings, probes, head) != mod.variant_key(settings, probes, other)


def test_report_rows_show_streaming_fraction_and_kv_bytes(tmp_path):
    from vllm_lighttransfer.eval.report import streaming_columns, summary_markdown

    def recs(variant, answers):
        return [{"variant": variant, "task": "passkey", "length": 4096, "depth": 0.5,
                 "sample": s, "kind": "number", "correct": c} for s, c in enumerate(answers)]

    variants = [Variant("full", "unconverted", 0.0, None),
                Variant("score-50", "score", 0.5, (2, 3)),
                Variant("head-50", "head", 0.5, (), ((0,), (0,), (1,), (0,))),
                Variant("head-25", "head", 0.25, (), ((), (0,), (), (0,)))]
    answers = {"full": [1, 1, 1, 1], "score-50": [1, 0, 0, 1], "head-50": [1, 1, 1, 0],
               "head-25": [1, 1, 1, 1]}
    results = [VariantResult(v, recs(v.name, [bool(a) for a in answers[v.name]]),
                             seconds={"total": 1.0}) for v in variants]
    settings = {"model": "tiny", "tasks": ["passkey"], "lengths": [4096], "depths": [0.5],
                "samples": {"4096": 4}, "sink_tokens": 4, "window_tokens": 1020,
                "longest_variants": ["full", "score-50", "head-50", "head-25"],
                "num_layers": 4, "num_kv_heads": 2, "base_architecture": "LlamaForCausalLM"}
    records = [r for res in results for r in res.records]
    md, data = summary_markdown(records, results, settings, {"from": "test"}, {"total": 1.0},
                                [], "cmd")
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert "| streams | KV heads streaming | KV saved at 4K |" in rows["variant"]
    # The paper's formula: saved = fraction * (1 - (sink + window) / context).
    assert rows["full"].startswith("| full | none | 0.0% | 0.0% |")
    assert rows["score-50"].startswith("| score-50 | 2 of 4 layers | 50.0% | 37.5% |")
    assert rows["head-50"].startswith("| head-50 | 4 of 8 KV heads | 50.0% | 37.5% |")
    assert rows["head-25"].startswith("| head-25 | 2 of 8 KV heads | 25.0% | 18.8% |")
    assert "- head-50: 0:0 1:0 2:1 3:0" in md
    assert "- head-50 vs full: -25.0 points; score-50 (per layer, same fraction of KV heads): " \
           "-50.0 points" in md
    assert data["streaming"]["head-50"]["fraction"] == 0.5
    assert data["streaming"]["head-50"]["kv_bytes_saved"] == pytest.approx(0.375)
    assert data["streaming"]["head-50"]["streaming_kv_heads"] == [[0], [0], [1], [0]]
    assert data["streaming"]["score-50"]["streaming_kv_heads"] is None
    # Without the model's shape (summaries of earlier runs): counts only.
    bare = {k: v for k, v in settings.items() if k not in ("num_layers", "num_kv_heads")}
    assert streaming_columns(variants[2], bare) == {"streams": "4 KV heads", "fraction": None,
                                                    "kv_bytes_saved": None}


def test_retrieval_head_scores_build_format_2_folders(tmp_path, tiny_llama):
    """head-F from the converter's retrieval calibration, scored on the tiny
    model: a valid format-2 folder with the asked fraction of pairs."""
    from vllm_lighttransfer.config import PER_HEAD_VERSION, LightTransferConfig
    from vllm_lighttransfer.convert.retrieval import RETRIEVAL
    from vllm_lighttransfer.eval.runner import layer_scores, materialize

    cache = tmp_path / "retrieval_scores.json"
    kw = dict(cache=cache, calibration=RETRIEVAL, sink_tokens=4, window_tokens=32,
              calibration_length=160, calibration_count=2, kv_heads=True, progress=False)
    scores = layer_scores(tiny_llama, **kw)
    assert scores["from"] == "scored now"
    assert scores["settings"]["calibration"] == RETRIEVAL and scores["settings"]["n_last"] == 1
    heads = scores["kv_head_per_prompt"]
    assert [len(heads), len(heads[0]), len(heads[0][0])] == [2, 4, 2]  # prompts, layers, KV heads
    assert layer_scores(tiny_llama, **kw)["from"] == str(cache)  # cached
    vs = plan_variants(scores["per_prompt"], [], [], stream_all=False,
                       head_per_prompt=heads, head_fractions=[0.25, 0.5, 0.75])
    for v in vs[1:]:
        folder = materialize(v, tiny_llama, tmp_path / "models", sink=4, window=32)
        config = json.loads((folder / "config.json").read_text())
        cfg = LightTransferConfig.from_hf_config(config)
        assert config["lighttransfer"]["format_version"] == PER_HEAD_VERSION
        assert config["lighttransfer"]["evaluation_variant"] == v.name
        assert cfg.streaming_kv_heads == v.streaming_kv_heads
        assert cfg.lazy_fraction == v.fraction  # 2, 4, 6 of 8 pairs
        assert (folder / "model.safetensors").is_symlink()


# ---------------------------------------------------------------- end to end


@pytest.mark.engine
def test_runner_and_report_on_tiny_model(tmp_path, tiny_llama, tiny_tokenizer):
    from vllm_lighttransfer.eval.report import write_outputs
    from vllm_lighttransfer.eval.runner import engine, materialize, run_variant

    probes = P.build_probes(
        tiny_tokenizer, ["passkey", "needle"], {96: [0.2, 0.8], 160: [0.5]}, samples=2,
        essays=list(range(10, 400)) * 300, kinds=P.KINDS,
    )
    chunk = list(range(10, 110))
    results = []
    for v in (Variant("full", "unconverted", 0.0, None), Variant("score-50", "score", 0.5, (1, 3)),
              Variant("head-50", "head", 0.5, (), ((0,), (1,), (0, 1), ()))):
        folder = materialize(v, tiny_llama, tmp_path / "models", sink=4, window=32)
        with engine(folder, dtype="float32", max_model_len=512, max_num_batched_tokens=512) as llm:
            res = run_variant(llm, v, probes, [chunk], max_tokens=4, use_tqdm=False)
        assert len(res.records) == len(probes)
        assert {r["correct"] for r in res.records} <= {True, False}
        assert {r["kind"] for r in res.records} == {"number", "word"}
        assert all(isinstance(r["output"], str) for r in res.records)
        assert len(res.nlls) == 1 and len(res.nlls[0]) == len(chunk) - 1
        assert all(x >= 0 for x in res.nlls[0])
        res = VariantResult.from_dict(json.loads(json.dumps(res.to_dict())))
        results.append(res)
    # Lazy layers change nothing before sink + window: same NLLs up to there.
    a, b, c = (r.nlls[0] for r in results)
    assert a[:30] == pytest.approx(b[:30], abs=1e-3)
    assert a[:30] == pytest.approx(c[:30], abs=1e-3)  # streaming KV heads neither
    settings = {"model": str(tiny_llama), "tasks": ["passkey", "needle"], "lengths": [96, 160],
                "kinds": list(P.KINDS),
                "depths": [0.2, 0.5, 0.8], "samples": {"96": 2, "160": 2}, "sink_tokens": 4,
                "window_tokens": 32, "ppl_length": 100, "ppl_chunks": 1,
                "longest_variants": ["full", "score-50", "head-50"], "num_layers": 4,
                "num_kv_heads": 2, "base_architecture": "LlamaForCausalLM"}
    md = write_outputs(tmp_path, results, settings, {"from": "test"}, {"total": 1.0}, "cmd")
    # Same fraction of KV heads, same bytes: 50% * (1 - 36 / 160) saved at 160 tokens.
    assert "| score-50 | 2 of 4 layers | 50.0% | 38.7% |" in md
    assert "| head-50 | 4 of 8 KV heads | 50.0% | 38.7% |" in md
    # Every accuracy with its interval; the row says what full answered of the same probes.
    assert "Wilson 95% interval" in md and "full right" in md and "kept of those" in md
    row = next(line for line in md.splitlines() if line.startswith("| score-50 | 2 of 4 layers |"))
    right = sum(r["correct"] for r in results[0].records)
    assert f"| {right}/{len(probes)} |" in row
    assert "Accuracy by needle kind" in md
    summary = json.loads((tmp_path / "summary.json").read_text())
    lo, hi = summary["accuracy"]["full"]["overall_wilson95"]
    assert 0 <= lo <= hi <= 1
    assert summary["accuracy"]["score-50"]["vs_full"]["probes"] == len(probes)
    for name in ("summary.md", "summary.json", "records.jsonl", "heatmap_full.png",
                 "heatmap_score-50.png", "heatmap_head-50.png", "heatmaps_all.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 3 * len(probes)
