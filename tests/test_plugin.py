"""Plugin registration and loud failures: a converted folder never runs as another model."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if __name__ == "__main__":
        from vllm import LLM
        kwargs = dict(enforce_eager=True, dtype="float32", max_model_len=256, block_size=32,
                      skip_tokenizer_init=True)
        if len(sys.argv) > 2:
            kwargs["model_impl"] = sys.argv[2]
        try:
            LLM(sys.argv[1], **kwargs)
        except Exception as e:
            print("REFUSED:", " ".join(str(e).split()))
            sys.exit(3)
        print("SERVED")
    """
)


def run_engine(model: Path, *extra: str, env_update: dict | None = None, tmp_path: Path):
    script = tmp_path / "engine.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.update(env_update or {})
    proc = subprocess.run(
        [sys.executable, str(script), str(model), *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.engine
def test_without_plugin_vllm_refuses(convert, tmp_path):
    code, out = run_engine(convert([1], 4, 20), env_update={"VLLM_PLUGINS": "none"}, tmp_path=tmp_path)
    assert code == 3, out[-3000:]
    assert "Model architectures ['LightTransferLlamaForCausalLM'] are not supported" in out


@pytest.mark.engine
def test_transformers_backend_refuses(convert, tmp_path):
    code, out = run_engine(convert([1], 4, 20), "transformers", tmp_path=tmp_path)
    assert code == 3, out[-3000:]
    assert "LightTransferLlamaForCausalLM" in out
    assert "SERVED" not in out


def test_converted_config_has_no_stock_window_keys(convert):
    import json

    cfg = json.loads((convert([1], 4, 20) / "config.json").read_text())
    assert cfg["architectures"] == ["LightTransferLlamaForCausalLM"]
    assert "layer_types" not in cfg and cfg.get("sliding_window") is None
    assert cfg["lighttransfer"]["lazy_layers"] == [1]


def test_vllm_command_works():
    exe = Path(sys.executable).with_name("vllm")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0.32.0" in proc.stdout


def test_entry_point_declared():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("lighttransfer") == "vllm_lighttransfer:register"


@pytest.mark.serve
def test_vllm_serve_rejects_bad_section_at_config_load(convert, tmp_path):
    """`vllm serve` stops at config load, before any engine, naming field and range."""
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(convert([1], 4, 20), bad, symlinks=True)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["lighttransfer"]["window_tokens"] = 0
    (bad / "config.json").write_text(json.dumps(cfg))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    exe = Path(sys.executable).with_name("vllm")
    proc = subprocess.run(
        [str(exe), "serve", str(bad), "--max-model-len", "256", "--block-size", "32",
         "--host", "127.0.0.1", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "lighttransfer.window_tokens=0: expected an integer >= 1" in out
    assert "EngineCore" not in out  # refused before any engine process started
