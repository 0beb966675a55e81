"""The plugin inside a real in-process vLLM engine, against stock vLLM and the oracle.

Every test starts a real vLLM engine (CPU, float32, block 32) on a tiny random
Llama built locally; greedy token streams are compared exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

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

pytestmark = pytest.mark.engine

LENGTHS = [37, 100, 260, 333]  # 2 to 11 blocks of 32, mixed in one batch
MAX_TOKENS = 16


def the_model(llm):
    return engine_core(llm).model_executor.driver_worker.worker.model_runner.model


def test_resolves_our_class_and_groups(convert):
    out = convert([1, 2], 3, 20)
    with make_llm(out) as llm:
        model = the_model(llm)
        assert type(model).__name__ == "LightTransferLlamaForCausalLM"
        kinds = [type(layer.self_attn.attn).__name__ for layer in model.model.layers]
        assert kinds == ["Attention", "SinkWindowAttention", "SinkWindowAttention", "Attention"]
        groups = engine_core(llm).scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups
        by_spec = {type(g.kv_cache_spec).__name__: g.layer_names for g in groups}
        assert by_spec["SinkWindowSpec"] == [
            "model.layers.1.self_attn.attn",
            "model.layers.2.self_attn.attn",
        ]
        assert by_spec["FullAttentionSpec"] == [
            "model.layers.0.self_attn.attn",
            "model.layers.3.self_attn.attn",
        ]


def test_no_lazy_layers_equals_stock(tiny_llama, convert):
    prompts = random_prompts(LENGTHS, seed=1)
    with make_llm(tiny_llama) as llm:
        stock = greedy(llm, prompts, MAX_TOKENS)
    with make_llm(convert([], 4, 20)) as llm:
        ours = greedy(llm, prompts, MAX_TOKENS)
    assert ours == stock


def test_all_lazy_with_long_window_equals_stock(tiny_llama, convert):
    prompts = random_prompts(LENGTHS, seed=2)
    with make_llm(tiny_llama) as llm:
        stock = greedy(llm, prompts, MAX_TOKENS)
    with make_llm(convert([0, 1, 2, 3], 4, 5000)) as llm:
        ours = greedy(llm, prompts, MAX_TOKENS)
    assert ours == stock


def test_sink0_equals_vllm_sliding_window(tiny_llama, convert, tmp_path):
    window = 50
    stock_sw = tmp_path / "stock-sw"
    shutil.copytree(tiny_llama, stock_sw)
    cfg = json.loads((stock_sw / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    cfg["sliding_window"] = window
    (stock_sw / "config.json").write_text(json.dumps(cfg))
    prompts = random_prompts(LENGTHS, seed=3)
    with make_llm(stock_sw) as llm:
        stock = greedy(llm, prompts, MAX_TOKENS)
    with make_llm(convert([1, 2], 0, window)) as llm:
        ours = greedy(llm, prompts, MAX_TOKENS)
    assert ours == stock
    # And the window really changes the result versus full attention.
    with make_llm(tiny_llama) as llm:
        full = greedy(llm, prompts, MAX_TOKENS)
    assert ours != full


# sink 5 ends inside the first block; window 45 is not a multiple of 32.
SINK, WINDOW, LAZY = 5, 45, [1, 3]


@pytest.fixture(scope="module")
def lazy_model(convert):
    return convert(LAZY, SINK, WINDOW)


@pytest.fixture(scope="module")
def mixed_prompts():
    return random_prompts(LENGTHS, seed=4)


@pytest.fixture(scope="module")
def expected(tiny_llama, lazy_model, mixed_prompts):
    return reference_greedy(tiny_llama, lazy_model, mixed_prompts)


@pytest.mark.parametrize("engine_kwargs", ENGINE_KINDS)
def test_matches_reference(lazy_model, mixed_prompts, expected, engine_kwargs):
    with make_llm(lazy_model, **engine_kwargs) as llm:
        assert greedy(llm, mixed_prompts, MAX_TOKENS) == expected


def test_plain_pytorch_path_matches_reference(lazy_model, mixed_prompts, expected, monkeypatch):
    """The fallback (no C++ kernel: no compiler, or LIGHTTRANSFER_CPU_KERNEL=0) in the engine."""
    from vllm_lighttransfer.attention import backend

    calls = []
    torch_path = backend.sink_window_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return torch_path(*args, **kwargs)

    monkeypatch.setattr(backend, "select_path", lambda device: backend.PATH_TORCH)
    monkeypatch.setattr(backend, "sink_window_attention", counted)
    with make_llm(lazy_model, enable_chunked_prefill=True, max_num_batched_tokens=64,
                  enable_prefix_caching=False) as llm:
        assert greedy(llm, mixed_prompts, MAX_TOKENS) == expected
    assert calls, "the engine never ran the plain-PyTorch path"


def test_differs_from_full_attention(tiny_llama, mixed_prompts, expected):
    # The mask must matter for these prompts, or the tests above prove nothing.
    with make_llm(tiny_llama) as llm:
        assert greedy(llm, mixed_prompts, MAX_TOKENS) != expected


def test_prefix_caching_hits_match_reference(tiny_llama, lazy_model):
    # Prompts sharing a 256-token prefix (8 blocks): the second wave hits the
    # cache, including sink blocks that were freed from the lazy group's table.
    shared = random_prompts([256], seed=5)[0]
    tails = random_prompts([10, 45, 77], seed=6)
    prompts = [shared + t for t in tails]
    expected = reference_greedy(tiny_llama, lazy_model, prompts)
    with make_llm(lazy_model, enable_prefix_caching=True, max_num_batched_tokens=128) as llm:
        first = greedy(llm, prompts[:1], MAX_TOKENS)
        second = greedy(llm, prompts, MAX_TOKENS)
        again = greedy(llm, prompts, MAX_TOKENS)
        stats = engine_core(llm).scheduler.kv_cache_manager.prefix_cache_stats
    assert first == expected[:1]
    assert second == expected
    assert again == expected
    assert stats is None or stats.hits >= 0


def test_preemption_recompute_matches_reference(tiny_llama, lazy_model):
    # Four requests of 3 full blocks each are admitted into 26 blocks; decoding
    # 40 tokens pushes each to 5 blocks, so the scheduler must preempt and
    # later recompute (prefill again) some of them.
    prompts = random_prompts([90, 92, 94, 95], seed=8)
    expected = reference_greedy(tiny_llama, lazy_model, prompts, max_tokens=40)
    got, preempted = greedy_preempted(lazy_model, prompts, 40, num_gpu_blocks_override=26,
                                      max_model_len=256, max_num_batched_tokens=256,
                                      enable_prefix_caching=False)
    assert preempted, "the run was expected to preempt"
    assert got == expected


def test_lazy_group_block_bound_and_release(lazy_model):
    """A long request keeps <= ceil(s/b) + ceil(w/b) + 1 real lazy blocks.

    That bound holds in decode. While a prefill chunk is in flight its blocks
    are allocated before the blocks below the window can be freed, so the
    prefill peak is ceil(s/b) + ceil((w - 1 + chunk)/b) + 1.
    """
    from vllm import SamplingParams

    chunk = 64
    bound = -(-SINK // BLOCK) + -(-WINDOW // BLOCK) + 1
    prefill_bound = -(-SINK // BLOCK) + -(-(WINDOW - 1 + chunk) // BLOCK) + 1
    prompt = random_prompts([300], seed=7)[0]
    with make_llm(lazy_model, max_num_batched_tokens=chunk, enable_prefix_caching=False) as llm:
        core = engine_core(llm)
        kvm = core.scheduler.kv_cache_manager
        managers = kvm.coordinator.single_type_managers
        lazy_mgr = next(m for m in managers if type(m).__name__ == "SinkWindowManager")
        full_mgr = next(m for m in managers if type(m).__name__ == "FullAttentionManager")
        free_before = kvm.block_pool.get_num_free_blocks()

        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        llm.llm_engine.add_request("long", {"prompt_token_ids": prompt}, params)
        max_lazy = max_prefill = max_full = steps = 0
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
            steps += 1
            # vLLM suffixes request ids internally: there is one request.
            for req_id, blocks in list(lazy_mgr.req_to_blocks.items()):
                real = len([b for b in blocks if not b.is_null])
                request = core.scheduler.requests[req_id]
                if request.num_computed_tokens > len(prompt):
                    max_lazy = max(max_lazy, real)
                else:
                    max_prefill = max(max_prefill, real)
                # The sink block is never freed.
                assert not blocks[0].is_null
                max_full = max(max_full, len(full_mgr.req_to_blocks[req_id]))
        assert steps > 100
        assert 0 < max_lazy <= bound
        assert 0 < max_prefill <= prefill_bound
        assert max_full == -(-(300 + 200 - 1) // BLOCK)  # full layers keep everything
        assert kvm.block_pool.get_num_free_blocks() == free_before


def test_invalid_section_is_a_clear_error(convert, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(convert([1], 4, 20), bad, symlinks=True)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["lighttransfer"]["lazy_layers"] = [1, 9]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception) as err:
        with make_llm(bad):
            pass
    text = "".join(str(e) for e in _chain(err.value))
    assert "lighttransfer.lazy_layers contains [9]" in text
    assert "[0, 3]" in text


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_reported_capacity_matches_analytic_limit(tiny_llama, convert):
    """vLLM's startup figure ("Maximum concurrency") counts steady-state lazy blocks."""
    from vllm_lighttransfer.config import kv_bytes_ratio

    kwargs = dict(max_model_len=2048, max_num_batched_tokens=2048)
    with make_llm(tiny_llama, **kwargs) as llm:
        full = engine_core(llm).vllm_config.cache_config.kv_cache_max_concurrency
    converted = convert([1, 2], 4, 124)
    with make_llm(converted, **kwargs) as llm:
        ours = engine_core(llm).vllm_config.cache_config.kv_cache_max_concurrency
    analytic = 1 / kv_bytes_ratio(lt_config(converted), 2048, block_size=BLOCK)
    assert analytic == pytest.approx(2 * 64 / (64 + 1 + 4 + 1))
    assert ours / full == pytest.approx(analytic, rel=0.05)


@pytest.mark.slow
def test_real_model_matches_reference(tmp_path_factory):
    """SmolLM2-135M (the embedded default), 1024 essay tokens, window 128, 256-token chunks."""
    from transformers import AutoTokenizer

    from vllm_lighttransfer.convert.calibration import default_calibration_dir
    from vllm_lighttransfer.convert.sources import resolve_source, smollm2_gguf
    from vllm_lighttransfer.convert.writer import convert_with_layers

    work = tmp_path_factory.mktemp("smollm2")
    src = resolve_source(smollm2_gguf(), work)
    lazy = [12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 23, 25, 26, 27, 28]
    out = convert_with_layers(src, work / "converted", lazy, 4, 128)
    essay = sorted(default_calibration_dir().glob("*.txt"))[0].read_text()
    prompt = AutoTokenizer.from_pretrained(src)(essay)["input_ids"][:1024]
    with make_llm(out, max_model_len=2048, max_num_batched_tokens=256) as llm:
        got = greedy(llm, [prompt], 8)
    assert got == reference_greedy(src, out, [prompt], 8)


def test_float32_head_copy_equals_vllms_cast(lazy_model, mixed_prompts, monkeypatch):
    """Converted folders ask for float32 logits (head_dtype); on CPU the model keeps
    one float32 copy of the lm_head instead of vLLM casting it every step: the
    tokens are the same as vLLM's own cast path, and the copy is really used."""
    from vllm_lighttransfer import model as lt_model

    assert json.loads((lazy_model / "config.json").read_text())["head_dtype"] == "float32"
    prompts = mixed_prompts[:2]
    with make_llm(lazy_model, dtype="bfloat16") as llm:
        head = the_model(llm)._float32_head
        assert head is not None and head.weight.dtype is torch.float32
        ours = greedy(llm, prompts, MAX_TOKENS)
    monkeypatch.setattr(lt_model, "float32_head", lambda model, vllm_config: None)
    with make_llm(lazy_model, dtype="bfloat16") as llm:
        assert the_model(llm)._float32_head is None
        assert greedy(llm, prompts, MAX_TOKENS) == ours


def test_warns_on_16bit_logits():
    from types import SimpleNamespace

    from vllm_lighttransfer.model import warn_on_16bit_logits

    def cfg(dtype, head):
        return SimpleNamespace(model_config=SimpleNamespace(dtype=dtype, head_dtype=head))

    assert warn_on_16bit_logits(cfg(torch.bfloat16, torch.bfloat16))
    assert not warn_on_16bit_logits(cfg(torch.bfloat16, torch.float32))
    assert not warn_on_16bit_logits(cfg(torch.float32, torch.float32))
