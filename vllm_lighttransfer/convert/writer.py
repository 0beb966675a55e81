"""Write a converted model folder: config.json names our architecture.

What it does
    Copies (or links) every file of the source folder except config.json,
    then writes config.json with ``architectures`` set to our class and the
    ``lighttransfer`` section added. Weights are never altered. The folder is
    written under a temporary name and renamed at the end, so a failure never
    leaves a half-written OUT behind. Imports no vLLM.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from vllm_lighttransfer.config import (
    PER_HEAD_VERSION,
    SECTION,
    SUPPORTED_BASES,
    LightTransferConfig,
    LightTransferConfigError,
)

# Keys that would make stock vLLM run plain sliding windows (no sinks).
_STOCK_WINDOW_KEYS = ("layer_types", "sliding_window", "use_sliding_window", "max_window_layers")


def base_architecture(config: Mapping[str, Any], src: str | None = None) -> str:
    """The supported stock architecture a config names (error lists the supported)."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_BASES:
            return arch
    what = (
        f"SRC={src}: architecture {', '.join(archs) or '(none)'}"
        if src is not None
        else f"architectures={archs!r}"
    )
    raise LightTransferConfigError(
        f"{what} is not supported; supported: {', '.join(sorted(SUPPORTED_BASES))}"
    )


def converted_config(
    config: Mapping[str, Any],
    lazy_layers: list[int],
    sink_tokens: int,
    window_tokens: int,
    provenance: Mapping[str, Any] | None = None,
    streaming_kv_heads: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Return the converted config.json content (validated).

    ``format_version`` is the lowest that expresses the folder: 1 for whole
    lazy layers (plugins of format 1 serve it), ``PER_HEAD_VERSION`` with
    ``streaming_kv_heads``.
    """
    base = base_architecture(config)
    section = dict(provenance or {})
    section.update(
        format_version=1 if streaming_kv_heads is None else PER_HEAD_VERSION,
        base_architecture=base,
        lazy_layers=sorted(lazy_layers),
        sink_tokens=sink_tokens,
        window_tokens=window_tokens,
    )
    if streaming_kv_heads is not None:
        section["streaming_kv_heads"] = [sorted(h) for h in streaming_kv_heads]
    num_kv_heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    LightTransferConfig.validate(section, config["num_hidden_layers"], base, num_kv_heads=num_kv_heads)
    out = dict(config)
    for key in _STOCK_WINDOW_KEYS:
        if key in out and key != "sliding_window":
            out.pop(key)
    if out.get("sliding_window") is not None and base == "LlamaForCausalLM":
        out.pop("sliding_window")
    out["architectures"] = [SUPPORTED_BASES[base]]
    out[SECTION] = section
    # Logits in float32 (vLLM's head_dtype): 16-bit logits tie near-equal
    # tokens and greedy decoding then picks another answer than float32
    # (issue 9; vllm_lighttransfer/model.py, warn_on_16bit_logits).
    out.setdefault("head_dtype", "float32")
    return out


def write_converted(
    src: str | Path,
    out: str | Path,
    config: Mapping[str, Any],
    link: bool = True,
    force: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
    move: bool = False,
) -> Path:
    """Materialize ``out`` from ``src`` with ``config`` as its config.json.

    ``link``: symlink each file of ``src``; otherwise copy it. ``move``
    (overrides ``link``): move the files instead, for a ``src`` that is our
    own scratch folder (a dequantized GGUF), so big weights are not copied.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for item in src.iterdir():
            if item.name == "config.json" or item.name.startswith("."):
                continue
            target = tmp / item.name
            if move:
                shutil.move(str(item), target)
            elif link:
                os.symlink(item.resolve(), target)
            elif item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name, data in (extra_files or {}).items():
            target = tmp / name
            if target.is_symlink() or target.exists():
                # Never write through a link into the source folder.
                target.unlink()
            target.write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_with_layers(
    src: str | Path,
    out: str | Path,
    lazy_layers: list[int],
    sink_tokens: int,
    window_tokens: int,
    link: bool = True,
    force: bool = False,
    provenance: Mapping[str, Any] | None = None,
    streaming_kv_heads: list[list[int]] | None = None,
) -> Path:
    """Convert with an explicit layer list, and optionally KV heads (no scoring)."""
    config = json.loads((Path(src) / "config.json").read_text())
    new = converted_config(config, lazy_layers, sink_tokens, window_tokens, provenance,
                           streaming_kv_heads=streaming_kv_heads)
    return write_converted(src, out, new, link=link, force=force)
