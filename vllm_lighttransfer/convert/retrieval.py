"""Built-in retrieval calibration (``--calibration retrieval``): seeded synthetic prompts.

What it does
    ``retrieval_prompts(tokenizer, length, count, sink_tokens, window_tokens)``
    builds ``count`` prompts of exactly ``length`` tokens in which the last
    position must look far back: a log of filler sentences hides one fact,
    and the prompt ends with a question about it and the start of the
    answer::

        BOS | intro | filler[:i] FACT filler[i:] | question | answer prefix
        `---------------------- length tokens, exactly ----------------------'

        FACT:          " Archive entry: the access code for the copper vault is KTR4819."
        question:      "\\n\\nQuestion: What is the access code for the copper vault?"
        answer prefix: "\\nAnswer: The access code for the copper vault is"

    The scored queries are the last ``n_last`` positions (default
    ``RETRIEVAL_N_LAST = 1``: the end of the answer prefix, the query that
    predicts the code's first token), so a KV head that retrieves the fact
    puts mass outside sink + window and scores low, one that ignores it
    scores high. Scoring prose (the default essays) measures how a head reads
    text; this measures whether it is needed to find something.

Placement
    The fact lies wholly outside the retained keys: it starts at or after
    ``sink_tokens`` and ends at or before ``length - window_tokens``. Its
    start is drawn uniformly in that range per prompt and moved to the
    nearest filler sentence boundary inside it (the fact never splits a
    sentence when a boundary is there). A ``length`` too short for that
    (the fixed parts and the fact do not fit before the window) is refused
    naming ``--calibration-length``.

Determinism
    Prompt ``i`` draws its filler, object, code and depth from
    ``random.Random(f"{seed}:retrieval:{i}")`` with ``RETRIEVAL_SEED``
    unless told otherwise: the same tokenizer, length and count always give
    the same prompts.

Kept apart from the quality tool
    Nothing is shared with ``eval/prompts.py`` (passkey and needle probes):
    the filler is synthetic log sentences, not the pass-key filler or the
    Paul Graham essays; the fact, question and answer templates are other
    sentences; the key is three capital letters and four digits, never a
    5-digit number or a word; the seed is distinct. A head chosen on these
    prompts is judged on the quality tool's probes without having seen them.

Constraints
    Plain text, no chat template (the score reads attention, not answers).
    The tokenizer's BOS is prepended only if it adds one by default, as for
    the text calibration. Imports no vLLM.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

from vllm_lighttransfer.config import LightTransferConfigError
from vllm_lighttransfer.convert.calibration import bos_prefix

RETRIEVAL = "retrieval"  # the --calibration keyword
RETRIEVAL_SEED = 52_361
RETRIEVAL_N_LAST = 1
RETRIEVAL_DESCRIPTION = "built-in retrieval prompts (synthetic log, one access code per prompt)"

INTRO = (
    "The following is a maintenance log kept at a remote station. One entry "
    "records an access code; the rest are routine notes.\n\n"
)
FACT = " Archive entry: the access code for the {item} is {code}."
QUESTION = "\n\nQuestion: What is the access code for the {item}?"
ANSWER_PREFIX = "\nAnswer: The access code for the {item} is"

ITEMS = (
    "copper vault", "east greenhouse", "night shuttle", "pump house", "signal cabin",
    "tool locker", "boiler room", "seed bank", "chart archive", "ice cellar",
    "cable drum", "fuel depot", "north hangar", "weather hut", "salt store", "drone bay",
)

# Filler: one sentence = subject + action + object + circumstance, drawn at
# random (8 x 8 x 8 x 8 combinations), so no phrase repeats on a fixed cycle.
_SUBJECTS = (
    "The surveyor", "A night clerk", "The ferry pilot", "An old beekeeper",
    "The radio operator", "A tired courier", "The lamp keeper", "A young botanist",
)
_ACTIONS = (
    "logged", "measured", "repainted", "inspected", "catalogued", "oiled",
    "photographed", "counted",
)
_OBJECTS = (
    "the rusted weather vane", "seven crates of lamp oil", "the tide markers",
    "a row of beech saplings", "the signal mast", "the granary ledgers",
    "two cracked barometers", "the canal sluices",
)
_CIRCUMSTANCES = (
    "before the morning fog lifted.", "while the kettle boiled.",
    "during a long grey drizzle.", "after the supply barge left.",
    "under a pale orange sky.", "as the chapel bell struck nine.",
    "without a word to anyone.", "near the slate quarry.",
)


def is_retrieval(calibration: Any) -> bool:
    """Whether a ``--calibration`` value names these prompts (the string, not a path)."""
    return isinstance(calibration, str) and calibration == RETRIEVAL


@dataclass(frozen=True)
class RetrievalPrompt:
    """One calibration prompt and where its fact is."""

    token_ids: tuple[int, ...]
    code: str
    fact_start: int  # index of the fact's first token in token_ids
    fact_tokens: int


def _sentence(rng: random.Random) -> str:
    return " " + " ".join(
        rng.choice(part) for part in (_SUBJECTS, _ACTIONS, _OBJECTS, _CIRCUMSTANCES)
    )


def _code(rng: random.Random) -> str:
    letters = "".join(rng.choice(string.ascii_uppercase) for _ in range(3))
    return letters + "".join(rng.choice(string.digits) for _ in range(4))


def retrieval_prompt(
    tokenizer: Any, length: int, sink_tokens: int, window_tokens: int, index: int,
    seed: int = RETRIEVAL_SEED,
) -> RetrievalPrompt:
    """Prompt ``index`` of the built-in retrieval calibration (see module doc)."""
    rng = random.Random(f"{seed}:{RETRIEVAL}:{index}")
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    item, code = rng.choice(ITEMS), _code(rng)
    fact_text = FACT.format(item=item, code=code)
    tail_text = QUESTION.format(item=item) + ANSWER_PREFIX.format(item=item)
    head = bos_prefix(tokenizer) + enc(INTRO)
    fact, tail = enc(fact_text), enc(tail_text)
    num_filler = length - len(head) - len(fact) - len(tail)
    # The fact must start at >= sink and end at <= length - window.
    lo = max(0, sink_tokens - len(head))
    hi = min(num_filler, length - window_tokens - len(fact) - len(head))
    if num_filler < 0 or hi < lo:
        need = len(head) + len(fact) + len(tail) + max(sink_tokens - len(head), 0) + window_tokens
        raise LightTransferConfigError(
            f"--calibration-length {length}: too short for --calibration {RETRIEVAL}; the fact "
            f"must lie outside --sink-tokens {sink_tokens} + --window-tokens {window_tokens}, "
            f"which needs at least {need} tokens with this tokenizer"
        )
    filler: list[int] = []
    boundaries = [0]  # filler token indices where a sentence starts
    while len(filler) < num_filler:
        filler += enc(_sentence(rng))
        boundaries.append(len(filler))
    filler = filler[:num_filler]  # the last sentence may be cut short
    target = rng.randint(lo, hi)
    inside = [b for b in boundaries if lo <= b <= hi]
    cut = min(inside, key=lambda b: (abs(b - target), b)) if inside else target
    ids = head + filler[:cut] + fact + filler[cut:] + tail
    assert len(ids) == length, (len(ids), length)
    return RetrievalPrompt(
        token_ids=tuple(ids),
        code=code,
        fact_start=len(head) + cut,
        fact_tokens=len(fact),
    )


def retrieval_prompts(
    tokenizer: Any, length: int, count: int, sink_tokens: int, window_tokens: int,
    seed: int = RETRIEVAL_SEED,
) -> list[RetrievalPrompt]:
    """``count`` prompts of exactly ``length`` tokens (see module doc)."""
    return [
        retrieval_prompt(tokenizer, length, sink_tokens, window_tokens, i, seed)
        for i in range(count)
    ]
