"""The Triton lazy-layer kernel against the dense reference and the plain-PyTorch path.

Runs on a GPU where there is one, otherwise on CPU tensors through Triton's
interpreter: this module sets ``TRITON_INTERPRET=1`` itself (Triton reads it
when a kernel is defined, so it is set before the kernel module is imported,
and the module is reloaded if something imported it earlier);
``TRITON_INTERPRET=1 pytest -m triton`` works too. Skipped where Triton is
not installed. The cases (``CASES`` in ``bench/gpu_check.py``, shared with the
GPU check script) are small: the interpreter runs every program in Python.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
# Triton decides interpreted or compiled when it is first imported; in a
# full test run vLLM has imported it long before this module (without the
# interpreter), and its kernels then fail on CPU tensors. In that case these
# tests run in a fresh process instead (tests/test_triton_fresh.py).
NEEDS_FRESH_PROCESS = (
    not ON_GPU and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
)
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(NEEDS_FRESH_PROCESS, reason="Triton was imported without its interpreter "
                       "earlier in this process: run in a fresh one by tests/test_triton_fresh.py"),
]
pytest.importorskip("triton", reason="Triton is not installed: the Triton kernel path is unavailable")

from vllm_lighttransfer.attention import triton_sink_window as tsw  # noqa: E402

if not ON_GPU:
    # Someone (vLLM, the backend) may have imported the module before the
    # variable was set: define its kernels again, now interpreted.
    tsw = importlib.reload(tsw)

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lighttransfer_gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_check  # dataclasses look their module up
_spec.loader.exec_module(gpu_check)

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.mark.parametrize("case", gpu_check.CASES, ids=lambda c: c.name)
def test_case_equals_reference_and_paged(case):
    result = gpu_check.check_batch(gpu_check.build_batch(case, DEVICE))
    assert result["finite"], result
    assert result["untouched_past_batch"], result
    assert result["max_err_reference"] <= case.tol, result
    assert result["max_err_paged"] <= 2 * case.tol + 1e-5, result


@pytest.mark.parametrize("seed", range(4))
def test_random_batches(seed):
    case = gpu_check.random_case(seed)
    result = gpu_check.check_batch(gpu_check.build_batch(case, DEVICE))
    assert result["ok"], result


def test_freed_blocks_really_hold_nan():
    """The NaN cases are not vacuous: freed blocks exist, hold NaN, sit in the table as 0,
    and a kernel reading one would return NaN."""
    case = gpu_check.Case("frees", [200], [1], sink=3, window=20)
    batch = gpu_check.build_batch(case, DEVICE)
    assert torch.isnan(batch.kv_cache[0].float()).all()
    # Decode at 199 needs keys 0..2 (block 0) and 180..199 (blocks 11, 12):
    # blocks 1..10 are freed.
    assert (batch.block_table[0, 1:11] == 0).all() and (batch.block_table[0, [0, 11, 12]] != 0).all()
    assert gpu_check.check_batch(batch)["ok"]
    # The same cache read with a window reaching into the freed blocks: NaN.
    batch.case = dataclasses.replace(case, window=50)
    assert torch.isnan(gpu_check.run_triton(batch)[:1].float()).any()


def test_fp8_write_quantizes_and_saturates():
    cache = torch.zeros(4, 1, 16, 2 * 16, dtype=torch.float8_e4m3fn, device=DEVICE)
    key = torch.linspace(-3, 3, 16).view(1, 1, 16).to(DEVICE)
    value = torch.full((1, 1, 16), 1000.0, device=DEVICE)  # 1000 / 0.5 = 2000 > 448: saturates
    ks, vs = torch.tensor([0.01], device=DEVICE), torch.tensor([0.5], device=DEVICE)
    tsw.write_kv_quantized(cache, key, value, torch.tensor([2 * 16 + 5], device=DEVICE), ks, vs)
    row = cache[2, 0, 5].float()
    expected_k = (key[0, 0] / 0.01).to(torch.float8_e4m3fn).float()
    assert torch.equal(row[:16], expected_k)
    assert torch.equal(row[16:], torch.full((16,), 448.0, device=DEVICE))
    # Dequantized as the kernel does: within e4m3's 3-bit mantissa (rel. 2^-4).
    torch.testing.assert_close(row[:16] * 0.01, key[0, 0], rtol=2 ** -4, atol=1e-3)
    assert cache.float().count_nonzero() == 32 - int((expected_k == 0).sum())  # nothing else written


def test_split_cases_really_split():
    """The split-KV cases run the segment path (else they would test nothing new)."""
    for case in gpu_check.CASES:
        if case.name.startswith("split_"):
            segments = gpu_check.check_batch(gpu_check.build_batch(case, DEVICE))["segments"]
            assert (segments == 1) if case.split_kv is False else (segments >= 2), (case.name, segments)


def test_split_segments():
    # Decode, batch 1, Llama-3-8B (8 KV heads), sink 4 + window 1020: 6 segments of 192 keys.
    assert tsw.split_segments(4, 1020, 4, 8, 1) == (6, 192)
    # 640 programs already: 2 segments reach the target of 1024.
    assert tsw.split_segments(4, 1020, 4, 640, 1) == (2, 576)
    assert tsw.split_segments(4, 1020, 4, 2048, 1) == (1, 0)  # enough programs
    assert tsw.split_segments(4, 1020, 16, 8, 2048) == (1, 0)  # prefill: never
    assert tsw.split_segments(0, tsw.FULL_WINDOW, 4, 8, 1) == (1, 0)  # unbounded window
    assert tsw.split_segments(4, 60, 4, 8, 1) == (1, 0)  # one tile of keys
    # Segments cover every key a tile of block_q queries can need.
    for sink, window, block_q, programs in [(4, 1020, 4, 8), (129, 1025, 1, 40), (70, 260, 4, 10), (0, 8000, 2, 1)]:
        n, keys = tsw.split_segments(sink, window, block_q, programs, 1)
        assert n <= tsw.MAX_SEGMENTS and keys % tsw.TILE_N == 0
        assert n * keys >= sink + window + block_q - 1 > (n - 1) * keys


def test_launch_shape():
    assert tsw.launch_shape(1, 32, 8) == (4, 16)  # decode: 4 heads x 4 tokens... rows for GQA 4
    assert tsw.launch_shape(2048, 32, 8) == (16, 64)
    assert tsw.launch_shape(1, 64, 2) == (1, 32)  # group 32 > 16 rows
    assert tsw.launch_shape(100, 6, 2) == (21, 64)  # group 3: 63 of 64 rows used


def test_imports_without_triton(monkeypatch):
    """No Triton: the module still imports (HAS_TRITON False) and the entry raises clearly."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("tsw_no_triton", tsw.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.HAS_TRITON is False
    with pytest.raises(RuntimeError, match="triton is not installed"):
        mod.sink_window_attention_triton(*([None] * 12))


def test_module_imports_no_vllm():
    code = (
        "import sys; import vllm_lighttransfer.attention.triton_sink_window as m; "
        "assert not [n for n in sys.modules if n == 'vllm' or n.startswith('vllm.')], 'vllm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)



AOT_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_lighttransfer.attention import triton_sink_window as tsw

pointers = {"out_ptr": "*bf16", "q_ptr": "*bf16", "kv_ptr": "*fp8e4nv", "qsl_ptr": "*i32",
            "seq_lens_ptr": "*i32", "bt_ptr": "*i32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
            "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32"}


def compile_sm90(kernel, constants):
    signature = {n: pointers.get(n, "constexpr" if n in constants else "fp32" if n == "scale" else "i32")
                 for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
    assert ".entry" in compiled.asm["ptx"]


main = dict(GROUP=4, HEAD_SIZE=128, HEAD_PAD=128, TILE=tsw.TILE_N, KV_FP8=True, IEEE=False, UPCAST=False,
            NUM_HEADS=32, num_reqs=1, sink_tokens=1, block_size=1)
compile_sm90(tsw._sink_window_kernel, dict(main, BLOCK_Q=16, BLOCK_M=64, NUM_SEG=1))  # prefill tiling
compile_sm90(tsw._sink_window_kernel, dict(main, BLOCK_Q=4, BLOCK_M=16, NUM_SEG=6))  # split decode
compile_sm90(tsw._combine_segments, dict(HEAD_SIZE=128, HEAD_PAD=128, NUM_SEG=6, SEG_PAD=8, NUM_HEADS=32))
print("compiled")
"""


def test_compiles_for_hopper():
    """Ahead-of-time compile to sm_90 PTX, no GPU needed: the interpreter checks no
    types, this does (fp8 cache, bf16 query, prefill tiling, split-KV decode
    and its merge kernel, and int arguments equal to 1, which Triton turns
    into constants). In a subprocess: the kernels
    of this process are interpreted ones."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is unavailable")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", AOT_COMPILE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("no ptxas to assemble PTX")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
