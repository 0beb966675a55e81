"""Config section validation: each bad input names the field and the allowed range."""

from __future__ import annotations

import pytest

from vllm_lighttransfer.config import (
    FORMAT_VERSION,
    PROVENANCE_KEYS,
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


# ---------------------------------------------------------------- format version


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(), 1),  # written before format_version existed: still servable
        (dict(format_version=1), 1),
        (dict(format_version=FORMAT_VERSION), FORMAT_VERSION),
    ],
)
def test_format_version_accepted(kw, expected):
    cfg = LightTransferConfig.from_hf_config(hf(**kw))
    # Written back at the lowest version that expresses it (whole layers: 1),
    # so a plugin of format 1 still serves per-layer folders.
    assert cfg.to_section()["format_version"] == 1
    assert "format_version" not in cfg.extra


@pytest.mark.parametrize(
    "value, message",
    [
        (FORMAT_VERSION + 1, f"lighttransfer.format_version={FORMAT_VERSION + 1}: this folder "
                             "was written by a newer converter"),
        (10**30, "upgrade vllm-lighttransfer"),
        (0, f"lighttransfer.format_version=0: expected an integer in [1, {FORMAT_VERSION}]"),
        (-1, "lighttransfer.format_version=-1: expected an integer in [1,"),
        (True, "lighttransfer.format_version=True: expected an integer"),
        (1.0, "lighttransfer.format_version=1.0: expected an integer"),
        ("1", "lighttransfer.format_version='1': expected an integer"),
        (None, "lighttransfer.format_version=None: expected an integer"),
    ],
)
def test_bad_format_version(value, message):
    with pytest.raises(LightTransferConfigError) as err:
        LightTransferConfig.from_hf_config(hf(format_version=value))
    assert message in str(err.value)


def test_newer_version_wins_over_unknown_keys():
    """A newer folder's new keys get the upgrade hint, not a bare 'unknown key'."""
    with pytest.raises(LightTransferConfigError, match="written by a newer converter"):
        LightTransferConfig.from_hf_config(
            hf(format_version=FORMAT_VERSION + 1, streaming_kv_heads=[[0, 1]])
        )


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(streaming_kv_head=[[0]]), "lighttransfer.streaming_kv_head: unknown key"),  # a typo
        (dict(sink_token=4), "lighttransfer.sink_token: unknown key"),  # a typo is not ignored
        (dict(provenance={"a": 1}), "lighttransfer.provenance: unknown key"),
        (dict(b=1, a=2), "lighttransfer.a, lighttransfer.b: unknown keys"),
        ({"X_note": 1}, "lighttransfer.X_note: unknown key"),  # the prefix is lower case
        ({"x": 1}, "lighttransfer.x: unknown key"),
    ],
)
def test_unknown_keys_refused(kw, message):
    with pytest.raises(LightTransferConfigError) as err:
        LightTransferConfig.from_hf_config(hf(**kw))
    text = str(err.value)
    assert message in text
    assert "free provenance keys start with 'x_'" in text and "upgrade vllm-lighttransfer" in text


@pytest.mark.parametrize(
    "kw",
    [
        {key: {"anything": [1, 2]} for key in sorted(PROVENANCE_KEYS)},
        {"x_note": "tuned by hand", "x_": None, "x_streaming_kv_heads": [0]},
        dict(scores=[0.1] * 4, settings={"n_last": 32}, lazy_frequency=[1.0] * 4),
    ],
    ids=["every-provenance-key", "free-x_-keys", "converter-output"],
)
def test_provenance_and_free_keys_kept(kw):
    cfg = LightTransferConfig.from_hf_config(hf(**kw))
    assert dict(cfg.extra) == kw
    assert LightTransferConfig.from_hf_config(dict(hf(), lighttransfer=cfg.to_section())) == cfg


def test_converter_writes_current_version():
    from vllm_lighttransfer.convert.writer import converted_config

    base = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4}
    section = converted_config(base, [1], 4, 60, {"method": "layers"})["lighttransfer"]
    assert section["format_version"] == 1  # whole layers: readable by format-1 plugins
    with pytest.raises(LightTransferConfigError, match="lighttransfer.notes: unknown key"):
        converted_config(base, [1], 4, 60, {"notes": "x"})  # refused when written, too


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(hf(), num_hidden_layers=True), "num_hidden_layers=True: expected an integer >= 1"),
        (dict(hf(), lighttransfer=[1, 3]), "lighttransfer: expected an object, got list"),
        (dict(hf(base_architecture="LlamaForCausalLM"), architectures="junk"),
         None),  # base_architecture given: architectures not consulted here
        (dict(hf(), lighttransfer=dict(section(base_architecture=["LlamaForCausalLM"]))),
         "lighttransfer.base_architecture=['LlamaForCausalLM'] is not supported"),
    ],
)
def test_whole_config_shapes(config, message):
    if message is None:
        LightTransferConfig.from_hf_config(config)
        return
    with pytest.raises(LightTransferConfigError) as err:
        LightTransferConfig.from_hf_config(config)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "archs, message",
    [
        ("LightTransferLlamaForCausalLM", "architectures='LightTransferLlamaForCausalLM': expected a list"),
        ([["LightTransferLlamaForCausalLM"]], "lighttransfer.base_architecture is missing and architectures="),
        (["LlamaForCausalLM"], "names none of ours"),
        (None, "lighttransfer.base_architecture is missing and architectures=[]"),
    ],
)
def test_base_from_architectures(archs, message):
    config = hf()
    config["architectures"] = archs
    with pytest.raises(LightTransferConfigError) as err:
        LightTransferConfig.from_hf_config(config)
    assert message in str(err.value)
    config["architectures"] = ["LightTransferQwen2ForCausalLM"]
    assert LightTransferConfig.from_hf_config(config).base_architecture == "Qwen2ForCausalLM"


# ---------------------------------------------------------------- per KV head (format 2)


def per_head(**kw):
    cfg = hf(format_version=2, lazy_layers=[3], **kw)
    cfg["num_key_value_heads"] = 3
    return cfg


def test_streaming_kv_heads_round_trip_and_helpers():
    cfg = LightTransferConfig.from_hf_config(per_head(streaming_kv_heads=[[], [0, 2], [0, 1, 2], [1]]))
    assert cfg.num_kv_heads == 3
    assert [cfg.streaming_heads(i) for i in range(4)] == [(), (0, 2), (0, 1, 2), (0, 1, 2)]
    assert [cfg.is_lazy(i) for i in range(4)] == [False, False, True, True]  # layer 3 via lazy_layers
    assert cfg.split_layers == (1,)
    assert cfg.lazy_fraction == pytest.approx(8 / 12)
    section = cfg.to_section()
    assert section["format_version"] == 2 and section["streaming_kv_heads"][1] == [0, 2]
    assert LightTransferConfig.from_hf_config(dict(per_head(), lighttransfer=section)) == cfg
    # KV bytes: the per-layer formula with KV heads in place of layers.
    assert kv_bytes_ratio(cfg, 8192) == pytest.approx(1 - 8 / 12 * (1 - 1024 / 8192))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(streaming_kv_heads=[[0]] * 3),
         "lighttransfer.streaming_kv_heads: expected a list with one entry per layer (4)"),
        (dict(streaming_kv_heads=[[], [3], [], []]),
         "lighttransfer.streaming_kv_heads[1] (layer 1) contains [3]: KV head indices must be in [0, 2]"),
        (dict(streaming_kv_heads=[[], [], [2, 0], []]),
         "lighttransfer.streaming_kv_heads[2]=[2, 0] (layer 2): KV head indices must be sorted and unique"),
        (dict(streaming_kv_heads=[[], [], [], "0"]),
         "lighttransfer.streaming_kv_heads[3]='0': expected a list of KV head indices in [0, 2]"),
        (dict(streaming_kv_heads=[[]] * 4, format_version=1),
         "lighttransfer.streaming_kv_heads needs lighttransfer.format_version >= 2 (got 1)"),
    ],
)
def test_bad_streaming_kv_heads(kw, message):
    config = per_head()
    config["lighttransfer"].update(kw)
    with pytest.raises(LightTransferConfigError) as err:
        LightTransferConfig.from_hf_config(config)
    assert message in str(err.value)
