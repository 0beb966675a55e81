"""The lazy-layer attention kernel for CPUs: a small C++ op built on first use.

What it does
    ``cpu_sink_window_attention`` runs ``csrc/sink_window_core.h`` (bound to torch
    by ``csrc/sink_window_cpu.cpp``): for every
    (request, query tile, KV head) it reads the sink blocks and the window
    blocks in place through the block table, with an online softmax in
    float32, and writes the output rows. No gathered copy of the keys, no
    mask tensor, no per-step plan: the op derives every range from
    ``query_start_loc``, ``seq_lens`` and the block table itself.

Build
    ``torch.utils.cpp_extension.load`` compiles the file the first time a
    process needs it (about a minute; gcc and ninja, both of which vLLM's CPU
    build already needs) with ``-O3 -march=native -ffast-math -fopenmp`` and
    caches the library under ``TORCH_EXTENSIONS_DIR`` (default
    ``~/.cache/torch_extensions``); later processes load it in milliseconds.
    The name carries a hash of the source and of this CPU's flags, so a home
    folder shared by different machines never loads a library built for
    another instruction set. Several processes building at once (tensor
    parallel workers) wait on torch's own lock.

Semantics and checks
    The same rule as ``reference.py``; ``tests/test_paged.py`` checks the op
    against the reference on random mixed batches (prefill, chunked
    prefill, decode, sinks ending inside a block, windows not aligned to
    blocks, NaN in freed blocks), float32 and bfloat16.

Limitations
    Head sizes up to 512, caches of the query's dtype (no FP8), a contiguous
    last dimension. ``available()`` is False where the build fails (no
    compiler) or ``LIGHTTRANSFER_CPU_KERNEL=0``; the backend then runs the
    plain-PyTorch path of ``paged.py`` and logs why, once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(f"vllm.{__name__}")

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "sink_window_cpu.cpp"  # the torch binding; includes sink_window_core.h
ENV_SWITCH = "LIGHTTRANSFER_CPU_KERNEL"
# Query tokens per work item. A key chunk, once loaded, serves every row of
# the tile (tokens x heads per KV head): larger tiles amortise it better,
# until the float32 rows leave L2. Measured on a 512-token chunk (SmolLM2
# shapes, one thread): 128 is 1.4x faster than 64, 256 slower than 128.
TILE = 128


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _load():
    """Build (once per machine) and load the op; the reason as a string on failure."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    try:
        from torch.utils.cpp_extension import load

        code = b"".join(f.read_bytes() for f in sorted(CSRC.glob("*.*")))
        digest = hashlib.sha256(code + _cpu_flags().encode()).hexdigest()[:12]
        logger.info("LightTransfer: loading the C++ CPU kernel (built once per machine "
                    "on first use: about a minute)")
        flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-Wno-psabi"]
        return load(
            name=f"lighttransfer_sink_window_cpu_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=flags,
            extra_include_paths=[str(CSRC)],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, read-only cache...
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def available() -> bool:
    mod = _load()
    if isinstance(mod, str):
        _warn_once(mod)
        return False
    return True


@functools.lru_cache(maxsize=1)
def _warn_once(reason: str) -> None:
    logger.warning(
        "LightTransfer: the C++ CPU kernel is not available (%s); lazy layers run the "
        "slower plain-PyTorch path", reason,
    )


def supports(query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether the op takes these tensors (else use the plain-PyTorch path)."""
    return (
        query.device.type == "cpu"
        and kv_cache.dtype == query.dtype
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and query.shape[-1] <= 512
        and query.stride(-1) == 1
        and kv_cache.stride(-1) == 1
        and available()
    )


def cpu_sink_window_attention(
    query: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2 * D]
    query_start_loc: torch.Tensor,  # [R + 1] int32
    seq_lens: torch.Tensor,  # [R] int32
    block_table: torch.Tensor,  # [R, max_blocks] int32
    sink_tokens: int,
    window_tokens: int,
    scale: float,
    output: torch.Tensor,  # [>= T, H, D], written in place
    tile: int = TILE,
) -> torch.Tensor:
    mod = _load()
    mod.sink_window_attention(
        query,
        kv_cache,
        query_start_loc.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(),
        block_table.to(torch.int32),
        output,
        int(sink_tokens),
        int(window_tokens),
        float(scale),
        int(tile),
    )
    return output
