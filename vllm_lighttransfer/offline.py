"""In-process vLLM engines for the tools, benchmarks and tests.

``offline_engine(model, **engine_args)`` yields a ``vllm.LLM`` and shuts its
engine core down and frees it on exit, so several engines can run one after
the other (or side by side) in one process. With
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core lives in this process and
``engine_core(llm)`` reaches its scheduler and KV cache manager.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def offline_engine(model: str | Path, **engine_args: Any) -> Iterator[Any]:
    from vllm import LLM

    llm = LLM(str(model), **engine_args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def engine_core(llm: Any) -> Any:
    """The in-process ``EngineCore`` (needs VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.llm_engine.engine_core.engine_core
