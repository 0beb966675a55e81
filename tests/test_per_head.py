"""Streaming per KV head (``streaming_kv_heads``, format 2) inside a real vLLM engine.

What it checks
    A tiny Llama (4 layers, 2 KV heads) whose streaming KV heads differ from
    layer to layer (one head, the other head, both, none) is served by vLLM
    with one attention module per KV head: streaming heads in the sink +
    window KV cache group (middle blocks freed), full heads in vLLM's own
    full-attention group. Greedy tokens equal the plain-PyTorch oracle with
    per-head masks (``ReferenceHybridModel``) for whole prefills, chunked
    prefill, the compiled model, prefix-cache hits and preemption; they
    differ from full attention and from the per-layer conversion, so the
    per-head masks really run. vLLM's reported capacity matches the analytic
    limit with KV heads in place of layers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import (
    BLOCK,
    ENGINE_KINDS,
    engine_core,
    greedy,
    greedy_preempted,
    lt_config,
    make_llm,
    random_prompts,
    reference_greedy,
)
from vllm_lighttransfer.convert.writer import converted_config

pytestmark = pytest.mark.engine

LENGTHS = [37, 100, 260, 333]
MAX_TOKENS = 16
SINK, WINDOW = 5, 45
# Layer 0 streams KV head 0, layer 1 head 1, layer 2 both, layer 3 none:
# 4 of 8 (layer, KV head) pairs stream.
HEADS = [[0], [1], [0, 1], []]


def per_head_folder(src: Path, out: Path, heads, sink: int, window: int) -> Path:
    """``src`` converted with ``streaming_kv_heads=heads`` (no scoring)."""
    shutil.copytree(src, out, symlinks=True)
    config = json.loads((src / "config.json").read_text())
    new = converted_config(config, [], sink, window, {"method": "test"}, streaming_kv_heads=heads)
    (out / "config.json").write_text(json.dumps(new, indent=2))
    return out


@pytest.fixture(scope="module")
def per_head_model(tiny_llama, tmp_path_factory):
    return per_head_folder(tiny_llama, tmp_path_factory.mktemp("per-head") / "m", HEADS, SINK, WINDOW)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=11)


@pytest.fixture(scope="module")
def expected(tiny_llama, per_head_model, prompts):
    return reference_greedy(tiny_llama, per_head_model, prompts)


def test_config_reads_back(per_head_model):
    cfg = lt_config(per_head_model)
    assert cfg.num_kv_heads == 2
    assert [cfg.streaming_heads(i) for i in range(4)] == [(0,), (1,), (0, 1), ()]
    assert cfg.split_layers == (0, 1)
    assert json.loads((per_head_model / "config.json").read_text())["lighttransfer"]["format_version"] == 2


def test_one_module_per_kv_head_and_two_groups(per_head_model):
    with make_llm(per_head_model) as llm:
        model = engine_core(llm).model_executor.driver_worker.worker.model_runner.model
        kinds = []
        for layer in model.model.layers:
            attn = layer.self_attn.attn
            assert type(attn).__name__ == "KVHeadSplitAttention"
            kinds.append([type(m).__name__ for m in attn.kv_heads])
        assert kinds == [
            ["SinkWindowAttention", "Attention"],
            ["Attention", "SinkWindowAttention"],
            ["SinkWindowAttention", "SinkWindowAttention"],
            ["Attention", "Attention"],
        ]
        groups = engine_core(llm).scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups
        by_spec = {type(g.kv_cache_spec).__name__: sorted(g.layer_names) for g in groups}
        assert len(groups) == 2
        assert by_spec["SinkWindowSpec"] == [
            "model.layers.0.self_attn.attn_kv0",
            "model.layers.1.self_attn.attn_kv1",
            "model.layers.2.self_attn.attn_kv0",
            "model.layers.2.self_attn.attn_kv1",
        ]
        assert all(g.kv_cache_spec.num_kv_heads == 1 for g in groups)


@pytest.mark.parametrize("engine_kwargs", ENGINE_KINDS)
def test_matches_reference(per_head_model, prompts, expected, engine_kwargs):
    with make_llm(per_head_model, **engine_kwargs) as llm:
        assert greedy(llm, prompts, MAX_TOKENS) == expected


def test_differs_from_full_and_from_per_layer(tiny_llama, convert, prompts, expected):
    """The per-head masks matter for these prompts, or the tests above prove nothing."""
    with make_llm(tiny_llama) as llm:
        assert greedy(llm, prompts, MAX_TOKENS) != expected
    # The same number of streaming KV heads as whole layers 0 and 2.
    assert reference_greedy(tiny_llama, convert([0, 2], SINK, WINDOW), prompts) != expected


def test_prefix_caching_and_preemption_match_reference(tiny_llama, per_head_model):
    shared = random_prompts([256], seed=12)[0]
    prompts = [shared + t for t in random_prompts([10, 45, 77], seed=13)]
    expected = reference_greedy(tiny_llama, per_head_model, prompts)
    with make_llm(per_head_model, enable_prefix_caching=True, max_num_batched_tokens=128) as llm:
        assert greedy(llm, prompts[:1], MAX_TOKENS) == expected[:1]
        assert greedy(llm, prompts, MAX_TOKENS) == expected
        assert greedy(llm, prompts, MAX_TOKENS) == expected
    # Four requests of 3 blocks admitted into 26 blocks, decoding 40 tokens each:
    # the scheduler must preempt and recompute some of them.
    prompts = random_prompts([90, 92, 94, 95], seed=14)
    expected = reference_greedy(tiny_llama, per_head_model, prompts, max_tokens=40)
    got, preempted = greedy_preempted(per_head_model, prompts, 40, num_gpu_blocks_override=26,
                                      max_model_len=256, max_num_batched_tokens=256,
                                      enable_prefix_caching=False)
    assert preempted, "the run was expected to preempt"
    assert got == expected


def test_reported_capacity_matches_analytic_limit(tiny_llama, tmp_path):
    """KV heads in place of layers: 4 of 8 stream, window 124 at 2048 tokens."""
    from vllm_lighttransfer.config import kv_bytes_ratio

    kwargs = dict(max_model_len=2048, max_num_batched_tokens=2048)
    with make_llm(tiny_llama, **kwargs) as llm:
        full = engine_core(llm).vllm_config.cache_config.kv_cache_max_concurrency
    converted = per_head_folder(tiny_llama, tmp_path / "cap", HEADS, 4, 124)
    with make_llm(converted, **kwargs) as llm:
        ours = engine_core(llm).vllm_config.cache_config.kv_cache_max_concurrency
    analytic = 1 / kv_bytes_ratio(lt_config(converted), 2048, block_size=BLOCK)
    assert analytic == pytest.approx(2 * 64 / (64 + 1 + 4 + 1))
    assert ours / full == pytest.approx(analytic, rel=0.05)
