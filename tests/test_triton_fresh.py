"""Runs tests/test_triton.py in a fresh process where this one cannot.

In a full test run vLLM imports Triton before tests/test_triton.py can set
``TRITON_INTERPRET=1``, and Triton decides interpreted or compiled at import:
the kernels would then fail on CPU tensors for a reason that is not theirs.
This test runs that file in a new Python process with the interpreter on
(once, about a minute), so the kernel is checked in every full run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_triton

pytestmark = pytest.mark.triton


@pytest.mark.skipif(not test_triton.NEEDS_FRESH_PROCESS,
                    reason="tests/test_triton.py runs in this process")
def test_triton_kernel_tests_in_a_fresh_process():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", str(here / "test_triton.py"), "-q", "-p", "no:cacheprovider"],
        cwd=here.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = (res.stdout + res.stderr)[-3000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
