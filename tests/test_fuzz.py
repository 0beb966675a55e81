"""Property-based tests (hypothesis): bad input is one clear error, never a crash.

What it checks
    - The ``lighttransfer`` section and the whole config dict (random values
      of every field: wrong types, bools, floats, huge and negative ints,
      duplicates, unsorted lists, unknown keys, missing keys, nested junk):
      every input gives either a valid ``LightTransferConfig`` that
      round-trips through ``to_section`` or exactly one
      ``LightTransferConfigError`` whose message names a field that is
      wrong. Which fields are wrong is decided by a small oracle written from
      the documented rules (``config.py`` Format/Constraints), not from the
      implementation's order of checks.
    - vLLM's config hook (``LightTransferConfigCheck``) on the same inputs
      given as attribute objects, as vLLM passes them.
    - ``lighttransfer convert`` flags through ``cli.main(argv)``: every run
      exits 2 with one ``error:`` line naming a wrong flag, or, with valid
      flags, reaches the SRC check (the flags are checked first, so a
      nonexistent SRC stops every valid run there, before any model loads).
      ``--layers`` is parsed against the model's layer count, after SRC, so it
      is fuzzed on the tiny model folder.

Settings
    Derandomized (fixed seed), no example database, no deadline (the machine
    is shared): the same examples every run. The whole file runs in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_lighttransfer.config import (
    ARCHITECTURES,
    FORMAT_VERSION,
    FREE_PREFIX,
    PROVENANCE_KEYS,
    SECTION,
    SEMANTIC_KEYS,
    SUPPORTED_BASES,
    LightTransferConfig,
    LightTransferConfigCheck,
    LightTransferConfigError,
)

FUZZ = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---------------------------------------------------------------- values

_HUGE = st.sampled_from([2**31, 2**63, -(2**63), 10**40, -(10**40)])
ints = st.integers(-5, 70) | st.integers() | _HUGE
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, 4.0, -1.0])
scalars = st.none() | st.booleans() | ints | floats | st.text(max_size=6)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


# Boundary values (random draws rarely hit 2 or True); every field is also
# crossed with every one of them in test_every_field_at_every_edge.
EDGES = [0, 1, 2, FORMAT_VERSION + 1, -1, True, False, 1.0, 0.5, "1", None, [], {}, [0]]
edges = st.sampled_from(EDGES)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------- oracle


def wrong_fields(config: dict) -> set[str]:
    """The fields of ``config`` the documented rules reject ({} = valid).

    Names are as a message shows them: ``lighttransfer.<key>``,
    ``num_hidden_layers``, ``architectures``, ``lighttransfer`` (the section).
    """
    section = config.get(SECTION)
    if not isinstance(section, dict):
        return {SECTION}
    wrong = set()
    n = config.get("num_hidden_layers")
    if not (is_int(n) and n >= 1):
        wrong.add("num_hidden_layers")
        n = None
    base = section.get("base_architecture")
    if base is None:
        archs = config.get("architectures") or []
        if not isinstance(archs, (list, tuple)):
            wrong.add("architectures")
        elif not any(isinstance(a, str) and a in ARCHITECTURES for a in archs):
            wrong |= {"architectures", f"{SECTION}.base_architecture"}
    elif not (isinstance(base, str) and base in SUPPORTED_BASES):
        wrong.add(f"{SECTION}.base_architecture")
    version = section.get("format_version", 1)
    if not (is_int(version) and 1 <= version <= FORMAT_VERSION):
        wrong.add(f"{SECTION}.format_version")
    for key in section:
        free = isinstance(key, str) and key.startswith(FREE_PREFIX)
        if not (free or key in SEMANTIC_KEYS or key in PROVENANCE_KEYS):
            wrong.add(f"{SECTION}.{key}" if isinstance(key, str) else f"{SECTION}[{key!r}]")
    for key in ("lazy_layers", "sink_tokens", "window_tokens"):
        if key not in section:
            wrong.add(f"{SECTION}.{key}")
    layers = section.get("lazy_layers", [])
    if not (
        isinstance(layers, (list, tuple))
        and all(is_int(i) for i in layers)
        and len(set(layers)) == len(layers)
        and (n is None or all(0 <= i < n for i in layers))
    ):
        wrong.add(f"{SECTION}.lazy_layers")
    sink = section.get("sink_tokens", 0)
    if not (is_int(sink) and sink >= 0):
        wrong.add(f"{SECTION}.sink_tokens")
    window = section.get("window_tokens", 1)
    if not (is_int(window) and window >= 1):
        wrong.add(f"{SECTION}.window_tokens")
    if "streaming_kv_heads" in section:
        heads = section["streaming_kv_heads"]
        kv = config.get("num_key_value_heads") or config.get("num_attention_heads")
        if not (
            is_int(version) and version >= 2
            and is_int(kv) and kv >= 1
            and isinstance(heads, (list, tuple)) and n is not None and len(heads) == n
            and all(
                isinstance(e, (list, tuple)) and all(is_int(h) and 0 <= h < kv for h in e)
                and list(e) == sorted(set(e))
                for e in heads
            )
        ):
            wrong.add(f"{SECTION}.streaming_kv_heads")
    return wrong


def check(config: dict, read, wrong: set[str] | None = None) -> None:
    """``read(config)`` succeeds iff nothing is ``wrong`` (default: the oracle's);
    else it raises one ``LightTransferConfigError`` naming a wrong field."""
    wrong = wrong_fields(config) if wrong is None else wrong
    try:
        cfg = read(config)
    except LightTransferConfigError as exc:
        message = str(exc)
        assert wrong, f"valid config refused: {message}"
        assert any(f in message for f in wrong), f"{message!r} names none of {sorted(wrong)}"
        return
    assert not wrong, f"accepted although {sorted(wrong)} are wrong"
    if cfg is None:  # the vLLM hook returns nothing
        return
    # A valid config round-trips: to_section -> from_hf_config gives it back.
    again = LightTransferConfig.from_hf_config(dict(config, **{SECTION: cfg.to_section()}))
    assert again == cfg and dict(again.extra) == dict(cfg.extra)
    # The lowest version that expresses it: 2 only with per-head streaming.
    assert cfg.to_section()["format_version"] == (2 if cfg.streaming_kv_heads is not None else 1)
    assert list(cfg.lazy_layers) == sorted(cfg.lazy_layers)


# ---------------------------------------------------------------- strategies

N_LAYERS = st.integers(1, 64)
bases = st.sampled_from(sorted(SUPPORTED_BASES))
provenance_keys = st.sampled_from(sorted(PROVENANCE_KEYS))
free_keys = st.text(max_size=6).map(lambda t: FREE_PREFIX + t)
other_keys = st.sampled_from(
    ["streaming_kv_head", "sink_token", "provenance", "notes", "X_note", "x", "layer_types", ""]
) | st.text(max_size=12)


@st.composite
def valid_configs(draw) -> dict:
    n = draw(N_LAYERS)
    layers = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    section: dict[str, Any] = dict(
        lazy_layers=layers,  # unsorted on purpose: the reader sorts
        sink_tokens=draw(st.integers(0, 10**6) | _HUGE.filter(lambda v: v >= 0)),
        window_tokens=draw(st.integers(1, 10**6) | _HUGE.filter(lambda v: v >= 1)),
    )
    base = draw(bases)
    if draw(st.booleans()):
        section["base_architecture"] = base
    if draw(st.booleans()):
        section["format_version"] = FORMAT_VERSION
    section.update(draw(st.dictionaries(provenance_keys | free_keys, junk, max_size=3)))
    return {"architectures": [SUPPORTED_BASES[base]], "num_hidden_layers": n, SECTION: section}


def _bad_layers(n: int):
    return (
        st.lists(st.integers(0, max(0, n - 1)), min_size=2, max_size=6).filter(
            lambda ls: len(set(ls)) < len(ls)
        )  # duplicates
        | st.lists(st.integers(-3, n + 3) | _HUGE, min_size=1, max_size=5)  # out of range
        | st.lists(st.booleans() | floats | st.text(max_size=3), min_size=1, max_size=3)
        | junk
    )


# One mutation per field: (field as named in messages, strategy of new values).
def _mutations(n: int) -> list[tuple[str, Any]]:
    anything = edges | junk | ints | floats
    return [
        ("format_version", anything),
        ("base_architecture", st.sampled_from(sorted(ARCHITECTURES) + ["llama", ""])
         | st.text(max_size=20) | junk),
        ("lazy_layers", edges | _bad_layers(n)),
        ("sink_tokens", anything),
        ("window_tokens", anything),
    ]


@st.composite
def single_fault(draw) -> dict:
    """A valid config with one thing changed: a field's value, a missing field, a new key."""
    config = draw(valid_configs())
    section = config[SECTION]
    n = config["num_hidden_layers"]
    kind = draw(st.sampled_from(["value", "missing", "unknown", "whole"]))
    if kind == "value":
        key, values = draw(st.sampled_from(_mutations(n)))
        section[key] = draw(values)
    elif kind == "missing":
        section.pop(draw(st.sampled_from(sorted(SEMANTIC_KEYS))), None)
    elif kind == "unknown":
        section[draw(other_keys | ints | st.booleans())] = draw(junk)
    else:
        key = draw(st.sampled_from(["num_hidden_layers", "architectures", SECTION]))
        config[key] = draw(junk | st.lists(st.sampled_from(sorted(ARCHITECTURES)) | junk, max_size=3))
    return config


@st.composite
def anything_configs(draw) -> dict:
    """Every field independently valid or not, or absent; several faults at once."""
    n = draw(N_LAYERS | edges | junk)
    n_ok = n if is_int(n) and n >= 1 else 4
    section = {}
    for key, bad in _mutations(n_ok):
        good = {
            "format_version": st.just(FORMAT_VERSION),
            "base_architecture": bases,
            "lazy_layers": st.lists(st.integers(0, n_ok - 1), unique=True, max_size=n_ok),
            "sink_tokens": st.integers(0, 2**70),
            "window_tokens": st.integers(1, 2**70),
        }[key]
        choice = draw(st.sampled_from(["good", "good", "bad", "absent"]))
        if choice != "absent":
            section[key] = draw(good if choice == "good" else bad)
    section.update(
        draw(st.dictionaries(provenance_keys | free_keys | other_keys, junk, max_size=3))
    )
    config: dict[str, Any] = {"num_hidden_layers": n, SECTION: section}
    if draw(st.booleans()):
        config["architectures"] = draw(
            st.lists(st.sampled_from(sorted(ARCHITECTURES) + sorted(SUPPORTED_BASES)), max_size=3)
            | junk
        )
    if draw(st.integers(0, 20)) == 0:
        config[SECTION] = draw(junk)  # the section itself is not an object
    return config


# ---------------------------------------------------------------- config properties


@settings(max_examples=300, **FUZZ)
@given(valid_configs())
def test_valid_configs_are_accepted_and_round_trip(config):
    assert not wrong_fields(config)
    check(config, LightTransferConfig.from_hf_config)


@settings(max_examples=300, **FUZZ)
@given(single_fault())
def test_one_fault_is_one_error_naming_it(config):
    check(config, LightTransferConfig.from_hf_config)


TOP_FIELDS = ("num_hidden_layers", "architectures")


@pytest.mark.parametrize("value", EDGES, ids=repr)
@pytest.mark.parametrize("key", sorted(SEMANTIC_KEYS) + list(TOP_FIELDS))
@settings(max_examples=4, **FUZZ)
@given(config=valid_configs())
def test_every_field_at_every_edge(config, key, value):
    """Each field x each boundary value (bools, 0, 2, 1.0, "1", None, [], {}) on 4 configs."""
    if key in TOP_FIELDS:
        config[key] = value
    else:
        config[SECTION][key] = value
    check(config, LightTransferConfig.from_hf_config)


@settings(max_examples=300, **FUZZ)
@given(anything_configs())
def test_any_config_is_valid_or_one_named_error(config):
    check(config, LightTransferConfig.from_hf_config)


def _hook(config: dict) -> None:
    """vLLM's path: ``model_config.hf_config`` is an attribute object, not a dict."""
    hf_config = SimpleNamespace(**config)
    LightTransferConfigCheck.verify_and_update_model_config(SimpleNamespace(hf_config=hf_config))


def hook_wrong_fields(config: dict) -> set[str]:
    """The hook also needs a list of architectures, each of ours wrapping the base."""
    wrong = wrong_fields(config)
    archs = config.get("architectures") or []
    if not isinstance(archs, (list, tuple)):
        wrong.add("architectures")
    elif not wrong:
        base = LightTransferConfig.from_hf_config(config).base_architecture
        if any(isinstance(a, str) and ARCHITECTURES.get(a, base) != base for a in archs):
            wrong.add(f"{SECTION}.base_architecture")
    return wrong


@settings(max_examples=200, **FUZZ)
@given(single_fault() | anything_configs())
def test_vllm_hook_is_valid_or_one_named_error(config):
    check(config, _hook, hook_wrong_fields(config))


def test_oracle_agrees_on_documented_examples():
    """The oracle itself, on cases whose answer is written in config.py's docstring."""
    ok = {"architectures": ["LightTransferLlamaForCausalLM"], "num_hidden_layers": 4,
          SECTION: {"lazy_layers": [3, 1], "sink_tokens": 0, "window_tokens": 1, "x_n": {}}}
    assert wrong_fields(ok) == set()
    newer = json.loads(json.dumps(ok))
    newer[SECTION].update(format_version=FORMAT_VERSION + 1, streaming_kv_heads=[0])
    assert wrong_fields(newer) == {f"{SECTION}.format_version", f"{SECTION}.streaming_kv_heads"}


# ---------------------------------------------------------------- CLI flags

INT_FLAGS = ("--sink-tokens", "--window-tokens", "--n-last", "--calibration-length",
             "--calibration-count")
FLOAT_FLAGS = ("--lazy-ratio", "--threshold")
DEVICES = ["cpu", "cpu:0", "cuda", "cuda:0", "cpu:x", "", "gpu", "CPU", " cpu"]
DTYPES = ["float32", "bfloat16", "float16", "float64", "fp16"]


def _run(argv: list[str]) -> tuple[int, str]:
    from vllm_lighttransfer.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, err.getvalue()


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _device_ok(name: str) -> bool:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    return device.type != "cuda" or torch.cuda.is_available()


def wrong_flags(flags: dict[str, str]) -> tuple[str, set[str]]:
    """("argparse" | "value" | "", the flags at fault) from the documented rules."""
    how = [f for f in ("--lazy-ratio", "--threshold", "--layers", "--preset") if f in flags]
    parse = {f for f in INT_FLAGS if f in flags and _parse_int(flags[f]) is None}
    parse |= {f for f in FLOAT_FLAGS if f in flags and _parse_float(flags[f]) is None}
    if "--dtype" in flags and flags["--dtype"] not in ("float32", "bfloat16", "float16"):
        parse.add("--dtype")
    if len(how) > 1:
        parse |= set(how)
    if parse:
        return "argparse", parse
    v = {f: (_parse_int(t) if f in INT_FLAGS else _parse_float(t) if f in FLOAT_FLAGS else t)
         for f, t in flags.items()}
    if "--preset" in v:
        clash = {"--sink-tokens", "--window-tokens"} & set(v)
        return ("value", clash | {"--preset"}) if clash else ("", set())
    wrong = set()
    scoring = "--layers" not in v
    sink, window = v.get("--sink-tokens", 4), v.get("--window-tokens", 1020)
    n_last, length = v.get("--n-last", 32), v.get("--calibration-length", 4096)
    if sink < 0:
        wrong.add("--sink-tokens")
    if window < 1:
        wrong.add("--window-tokens")
    if n_last < 1:
        wrong.add("--n-last")
    if scoring:
        if "--threshold" in v:
            if not 0.0 <= v["--threshold"] <= 1.0:
                wrong.add("--threshold")
        elif not 0.0 < v.get("--lazy-ratio", 0.5) <= 1.0:
            wrong.add("--lazy-ratio")
        if v.get("--calibration-count", 6) < 1:
            wrong.add("--calibration-count")
        # Relations between flags: the message may name any flag of the relation.
        if length <= sink + window:
            wrong |= {"--calibration-length", "--sink-tokens", "--window-tokens"}
        if n_last > length:
            wrong |= {"--n-last", "--calibration-length"}
        if not _device_ok(v.get("--device", "cpu")):
            wrong.add("--device")
    return ("value", wrong) if wrong else ("", set())


def _int_text():
    return (st.integers(-3, 5000) | _HUGE).map(str) | st.sampled_from(
        ["", "x", "1.5", "1e3", " 7", "+8", "0x10", "1_000", "nan"])


def _float_text():
    return (st.floats(-2, 3) | st.sampled_from([0.0, 1.0, 0.5])).map(repr) | st.sampled_from(
        ["nan", "inf", "-inf", "", "x", "1/2", "1e-9", "1,5", ".5"])


@st.composite
def flag_sets(draw) -> dict[str, str]:
    flags: dict[str, str] = {}
    for f in INT_FLAGS:
        if draw(st.booleans()):
            flags[f] = draw(_int_text())
    how = draw(st.sampled_from(["none", "none", "--lazy-ratio", "--threshold", "--layers",
                                "--preset", "two"]))
    if how in FLOAT_FLAGS:
        flags[how] = draw(_float_text())
    elif how == "--layers":
        flags[how] = "1,3"
    elif how == "--preset":
        flags[how] = "qwq-32b-lighttransfer"
    elif how == "two":
        flags["--lazy-ratio"], flags["--threshold"] = "0.5", "0.5"
    if draw(st.booleans()):
        flags["--device"] = draw(st.sampled_from(DEVICES))
    if draw(st.integers(0, 4)) == 0:
        flags["--dtype"] = draw(st.sampled_from(DTYPES))
    return flags


MISSING_SRC = "/nonexistent/lighttransfer-fuzz-src"


@settings(max_examples=120, **FUZZ)
@given(flag_sets())
def test_cli_flags_one_error_line_naming_the_flag(flags):
    argv = ["convert", MISSING_SRC, "/nonexistent/lighttransfer-fuzz-out"]
    argv += [f"{f}={t}" for f, t in flags.items()]  # --flag=value: "-1" is a value
    rc, err = _run(argv)
    stage, wrong = wrong_flags(flags)
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert rc == 2, (rc, err)
    assert len(error_lines) == 1, err
    line = error_lines[0]
    if stage == "argparse":
        # argparse's own format: usage, then "PROG: error: argument --flag...".
        assert line.startswith("lighttransfer convert: error: argument "), err
    else:
        assert err.strip() == line and line.startswith("error: "), err
    if wrong:
        assert any(f in line for f in wrong), f"{line!r} names none of {sorted(wrong)}"
    else:
        # Valid flags: the run got past every flag check to SRC, before any model load.
        assert line == f"error: SRC={MISSING_SRC}: no such file or folder", line


def test_cli_short_calibration_names_calibration_length():
    rc, err = _run(["convert", MISSING_SRC, "/nonexistent/out", "--calibration-length=100",
                    "--window-tokens=200"])
    assert rc == 2 and "--calibration-length" in err


def _layers_text():
    items = st.integers(-2, 6).map(str) | st.sampled_from(["", " ", "x", "1.0", "+1", "٣", "1_0"])
    return st.lists(items, max_size=5).map(",".join) | st.text("0123456789,- x", max_size=8)


def _layers_oracle(text: str, n: int) -> list[int] | None:
    items = [t.strip() for t in text.split(",") if t.strip()]
    values = [_parse_int(t) for t in items]
    if any(v is None or not 0 <= v < n for v in values) or len(set(values)) < len(values):
        return None
    return sorted(values)


@settings(max_examples=40, **FUZZ)
@given(text=_layers_text())
def test_cli_layers_on_a_real_model(tiny_llama, text):
    n = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        rc, err = _run(["convert", str(tiny_llama), str(out), f"--layers={text}", "-q"])
        expected = _layers_oracle(text, n)
        if expected is None:
            lines = [line for line in err.splitlines() if line.strip()]
            assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: --layers"), err
            assert not out.exists()
        else:
            assert rc == 0, err
            cfg = LightTransferConfig.from_hf_config(json.loads((out / "config.json").read_text()))
            assert list(cfg.lazy_layers) == expected


def test_float_flags_reject_non_finite():
    """nan never satisfies a range check: refused, not silently accepted."""
    assert wrong_flags({"--lazy-ratio": "nan"}) == ("value", {"--lazy-ratio"})
    rc, err = _run(["convert", MISSING_SRC, "/x", "--lazy-ratio=nan"])
    assert rc == 2 and err.startswith("error: --lazy-ratio=nan")
