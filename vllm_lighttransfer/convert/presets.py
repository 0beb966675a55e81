"""Published masks (``configs/*.json``): find, load, check against a model.

A preset names its lazy layers (``lazy_layers``) and, optionally, single
streaming KV heads (``streaming_kv_heads``, format 2, with
``expected_config.num_key_value_heads``); the converter writes both as given.

What it does
    ``preset_path(name)`` finds a preset by name or by path to a JSON file,
    ``load_preset(name)`` reads and checks its required keys,
    ``check_preset_matches(preset, config, base)`` refuses a preset made for
    another model, ``list_presets()`` returns every shipped preset. No scoring,
    no torch, no vLLM.

Where the files live
    ``vllm_lighttransfer/presets`` links to the top-level ``configs/`` in a
    checkout; a wheel carries the JSON files there as package data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_lighttransfer.config import LightTransferConfigError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"

_REQUIRED = ("base_architecture", "num_hidden_layers", "lazy_layers", "sink_tokens", "window_tokens")


def preset_path(name: str) -> Path:
    """A preset by name (``configs/NAME.json``) or by path to a JSON file."""
    as_path = Path(name).expanduser()
    if as_path.suffix == ".json" and as_path.is_file():
        return as_path
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.json"))) or "none"
        raise LightTransferConfigError(f"--preset {name}: unknown preset; known: {known}")
    return path


def load_preset(name: str) -> dict[str, Any]:
    path = preset_path(name)
    try:
        preset = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LightTransferConfigError(f"preset {path}: not valid JSON ({exc.msg})") from None
    for key in _REQUIRED:
        if key not in preset:
            raise LightTransferConfigError(f"preset {path}: '{key}' is missing")
    if preset.get("streaming_kv_heads") is not None and not isinstance(
        preset.get("expected_config", {}).get("num_key_value_heads"), int
    ):
        raise LightTransferConfigError(
            f"preset {path}: 'streaming_kv_heads' needs expected_config.num_key_value_heads"
        )
    preset["_path"] = str(path)
    return preset


def check_preset_matches(preset: dict[str, Any], config: dict[str, Any], base: str) -> None:
    name = preset.get("name", preset["_path"])
    if preset["base_architecture"] != base:
        raise LightTransferConfigError(
            f"preset {name} is for {preset['base_architecture']}, SRC is {base}"
        )
    expected = {"num_hidden_layers": preset["num_hidden_layers"], **preset.get("expected_config", {})}
    for key, value in expected.items():
        if config.get(key) != value:
            raise LightTransferConfigError(
                f"preset {name} expects {key}={value}, SRC has {key}={config.get(key)!r}"
            )


def list_presets() -> list[tuple[str, dict[str, Any]]]:
    """``(name, content)`` of every shipped preset, sorted by name."""
    return [(p.stem, json.loads(p.read_text())) for p in sorted(PRESETS_DIR.glob("*.json"))]
