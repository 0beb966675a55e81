"""Config section validation: each bad input names the field and the allowed range."""

from __future__ import annotations

import pytest

from vllm_lighttransfer.config import (
    LightTransferConfig,
    LightTransferConfigError,
    kv_bytes_ratio,
)


def section(**kw):
    base = dict(lazy_layers=[1, 3], sink_tokens=4, window_tokens=1020)
    base.update(kw)
    return base


def hf(**kw):
    return {
        "architectures": ["LightTransferLlamaForCausalLM"],
        "num_hidden_layers": 4,
        "lighttransfer": section(**kw),
    }


def test_valid_section_round_trips():
    cfg = LightTransferConfig.from_hf_config(hf(lazy_layers=[3, 1], scores=[0.1] * 4))
    assert cfg.lazy_layers == (1, 3)
    assert cfg.base_architecture == "LlamaForCausalLM"
    assert cfg.architecture == "LightTransferLlamaForCausalLM"
    assert cfg.is_lazy(3) and not cfg.is_lazy(2)
    assert cfg.to_section()["scores"] == [0.1] * 4
    assert cfg.lazy_fraction == 0.5


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(lazy_layers=[1, 4]), "lighttransfer.lazy_layers contains [4]: indices must be in [0, 3]"),
        (dict(lazy_layers=[-1]), "lighttransfer.lazy_layers contains [-1]"),
        (dict(lazy_layers=[1, 1]), "lighttransfer.lazy_layers repeats [1]: indices must be unique"),
        (dict(lazy_layers="1,2"), "lighttransfer.lazy_layers='1,2': expected a list of integers in [0, 3]"),
        (dict(lazy_layers=[1.5]), "expected a list of integers"),
        (dict(sink_tokens=-1), "lighttransfer.sink_tokens=-1: expected an integer >= 0"),
        (dict(sink_tokens=True), "lighttransfer.sink_tokens=True"),
        (dict(window_tokens=0), "lighttransfer.window_tokens=0: expected an integer >= 1"),
        (dict(window_tokens="big"), "lighttransfer.window_tokens='big'"),
    ],
)
def test_bad_values_name_field_and_range(kw, message):
    with pytest.raises(LightTransferConfigError) as err:
        LightTransferConfig.from_hf_config(hf(**kw))
    assert message in str(err.value)


def test_missing_field():
    cfg = hf()
    del cfg["lighttransfer"]["window_tokens"]
    with pytest.raises(LightTransferConfigError, match="lighttransfer.window_tokens is missing"):
        LightTransferConfig.from_hf_config(cfg)


def test_missing_section():
    with pytest.raises(LightTransferConfigError, match="no 'lighttransfer' section"):
        LightTransferConfig.from_hf_config({"num_hidden_layers": 4})


def test_unknown_base_architecture_lists_supported():
    cfg = hf(base_architecture="GPT2LMHeadModel")
    with pytest.raises(LightTransferConfigError) as err:
        LightTransferConfig.from_hf_config(cfg)
    text = str(err.value)
    assert "base_architecture='GPT2LMHeadModel' is not supported" in text
    assert "LlamaForCausalLM" in text and "Qwen2ForCausalLM" in text


def test_empty_lazy_layers_is_allowed():
    assert LightTransferConfig.from_hf_config(hf(lazy_layers=[])).lazy_layers == ()


def test_kv_ratio_matches_paper_formula():
    cfg = LightTransferConfig.from_hf_config(
        dict(hf(lazy_layers=list(range(0, 30, 2)), sink_tokens=4, window_tokens=1020), num_hidden_layers=30)
    )
    # 1 - lazy_fraction * (1 - (sink + window) / context)
    assert kv_bytes_ratio(cfg, 8192) == pytest.approx(1 - 0.5 * (1 - 1024 / 8192))
    # Paged: 1 sink block + 32 window blocks + 1 partial block of 32 tokens.
    assert kv_bytes_ratio(cfg, 8192, block_size=32) == pytest.approx((256 + 34) / 512)


def test_architecture_must_match_base():
    cfg = LightTransferConfig.from_hf_config(hf())
    cfg.check_architecture("LightTransferLlamaForCausalLM")
    cfg.check_architecture("SomethingElse")  # not ours: nothing to compare
    with pytest.raises(LightTransferConfigError, match="expected 'Qwen2ForCausalLM'"):
        cfg.check_architecture("LightTransferQwen2ForCausalLM")
