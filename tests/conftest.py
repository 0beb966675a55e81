"""Shared fixtures: tiny random models built locally, converted folders, engines.

vLLM reads its environment at import time, so the CPU settings are set here,
before any test module imports vllm: a small KV cache (GiB) and the engine
core in this process (fast start, direct access to the scheduler).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vllm_lighttransfer.config import LightTransferConfig  # noqa: E402
from vllm_lighttransfer.convert.writer import convert_with_layers  # noqa: E402
from vllm_lighttransfer.offline import engine_core, offline_engine  # noqa: E402,F401
from tiny_model import build_tiny_llama  # noqa: E402  (tests/tiny_model.py)

BLOCK = 32  # the CPU attention backend needs block sizes that are multiples of 32


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 4-layer random Llama (hidden 128, 4 heads, 2 KV heads, head 32), float32."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def convert(tmp_path_factory, tiny_llama):
    """convert(layers, sink, window, src=tiny_llama) -> converted folder (cached)."""
    root = tmp_path_factory.mktemp("converted")
    cache: dict[tuple, Path] = {}

    def _convert(layers, sink, window, src: Path | None = None) -> Path:
        src = src or tiny_llama
        key = (tuple(layers), sink, window, str(src))
        if key not in cache:
            name = f"{src.name}-L{'_'.join(map(str, layers)) or 'none'}-s{sink}-w{window}"
            cache[key] = convert_with_layers(src, root / name, list(layers), sink, window)
        return cache[key]

    return _convert


def lt_config(path: Path) -> LightTransferConfig:
    return LightTransferConfig.from_hf_config(json.loads((path / "config.json").read_text()))


def reference_greedy(src: Path, converted: Path, prompts, max_tokens: int = 16) -> list[list[int]]:
    """Greedy tokens of the plain-PyTorch oracle (``ReferenceHybridModel``) for a converted folder."""
    from vllm_lighttransfer.reference import ReferenceHybridModel

    ref = ReferenceHybridModel.from_pretrained(str(src), lt_config(converted))
    return [ref.greedy(p, max_tokens) for p in prompts]


def random_prompts(lengths, seed: int = 0, vocab: tuple[int, int] = (4, 500)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(*vocab) for _ in range(n)] for n in lengths]


def make_llm(model: Path, **overrides):
    """An in-process vLLM engine on CPU, float32, freed on exit."""
    kwargs = dict(
        enforce_eager=True,
        dtype="float32",
        max_model_len=1024,
        block_size=BLOCK,
        skip_tokenizer_init=True,
        max_num_batched_tokens=1024,
        seed=0,
    )
    kwargs.update(overrides)
    return offline_engine(model, **kwargs)


def greedy(llm, prompts, max_tokens: int = 16) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]




# The engine kinds every exactness test runs: a whole prefill, chunked
# prefill in 64-token chunks, and what `vllm serve` runs by default (the
# model under torch.compile).
ENGINE_KINDS = [
    pytest.param(dict(enable_prefix_caching=False), id="whole-prefill"),
    pytest.param(
        dict(enable_chunked_prefill=True, max_num_batched_tokens=64, enable_prefix_caching=False),
        id="chunked-prefill-64",
    ),
    pytest.param(dict(enforce_eager=False, enable_prefix_caching=False), id="compiled"),
]


def greedy_preempted(model: Path, prompts, max_tokens: int, **overrides) -> tuple[list, list]:
    """Greedy tokens from a small-cache engine, and the ids it preempted."""
    with make_llm(model, **overrides) as llm:
        scheduler = engine_core(llm).scheduler
        preempted = []
        original = scheduler._preempt_request

        def counting(request, *args, **kwargs):
            preempted.append(request.request_id)
            return original(request, *args, **kwargs)

        scheduler._preempt_request = counting
        return greedy(llm, prompts, max_tokens), preempted
