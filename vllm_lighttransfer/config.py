"""LightTransfer configuration: the ``lighttransfer`` section of config.json.

What it does
    Parses and validates the section a converted model folder carries, and
    maps our architecture names to the stock ones they wrap. Imports no vLLM,
    so it tests in milliseconds and the converter can use it without vLLM.

Format (config.json)
    "architectures": ["LightTransferLlamaForCausalLM"],
    "lighttransfer": {
        "format_version": 1,          # 1, or 2 where streaming_kv_heads is present
        "base_architecture": "LlamaForCausalLM",
        "lazy_layers": [1, 3, 5],     # decoder layer indices with streaming attention
        "streaming_kv_heads": [[], [0, 2], ...],  # optional (format 2): per layer, the
                                      # KV heads that stream (query heads follow)
        "sink_tokens": 4,             # initial tokens every streaming head keeps
        "window_tokens": 1020,        # recent tokens every streaming head keeps
        "scores": [...], "settings": {...}, ...   # provenance, never read here
        "x_anything": ...             # free provenance: any key starting "x_"
    }

    Every key is one of three kinds:
    - semantic (``SEMANTIC_KEYS``): decides what attention computes, validated;
    - provenance (``PROVENANCE_KEYS``): what the converter records today
      (``convert.report.provenance`` and the quality tool's
      ``evaluation_variant``), kept in ``extra`` and never read;
    - free: starts with ``x_`` (``FREE_PREFIX``), for anyone's notes.
    Any other key is refused. A key this version does not know may change
    attention (a future ``streaming_kv_heads``, say), and serving the folder
    with today's semantics would be silently wrong; so an unknown key is an
    error naming it, never ignored. A new converter that adds a semantic key
    bumps ``format_version``, and a folder whose version is above
    ``FORMAT_VERSION`` is refused with "written by a newer converter".
    A missing ``format_version`` means 1: folders written before the field
    existed stay servable. The converter writes the lowest version that
    expresses the folder: 1 for whole lazy layers, 2 once
    ``streaming_kv_heads`` is present (a version-1 plugin refuses those).

Per KV head (format 2)
    ``streaming_kv_heads`` has one entry per layer: the sorted KV head
    indices in ``[0, num_key_value_heads)`` that stream in that layer; the
    query heads of a KV head follow it. ``lazy_layers`` keeps its meaning
    ("every KV head of that layer"); a folder may use either or both, and a
    layer's streaming heads are the union. ``streaming_heads(layer)`` gives
    it; ``split_layers`` lists the layers where some heads stream and some
    do not.

Constraints
    ``format_version`` an integer in ``[1, FORMAT_VERSION]`` (missing: 1),
    indices unique and in ``[0, num_hidden_layers)``, ``sink_tokens >= 0``,
    ``window_tokens >= 1``, base architecture one of ``SUPPORTED_BASES``, no
    unknown key. Every error names the field, the value and the allowed range.

Why not ``layer_types``/``sliding_window``
    Stock vLLM reads those keys and would serve plain sliding windows without
    sinks, silently losing quality. Our own architecture name and section make
    a vLLM without the plugin refuse the folder instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

SECTION = "lighttransfer"

# Our architecture name -> the stock vLLM architecture it wraps.
ARCHITECTURES: dict[str, str] = {
    "LightTransferLlamaForCausalLM": "LlamaForCausalLM",
    "LightTransferMistralForCausalLM": "MistralForCausalLM",
    "LightTransferQwen2ForCausalLM": "Qwen2ForCausalLM",
    "LightTransferQwen3ForCausalLM": "Qwen3ForCausalLM",
}
SUPPORTED_BASES: dict[str, str] = {base: ours for ours, base in ARCHITECTURES.items()}

# The section's format. Bump it with any change an older plugin would serve
# wrongly (a new key that changes attention, a new meaning of an old one): the
# older plugin then refuses the folder instead of serving today's semantics.
FORMAT_VERSION = 2
# The first version that knows ``streaming_kv_heads``.
PER_HEAD_VERSION = 2

# Keys that decide what attention computes; each is validated below.
SEMANTIC_KEYS = frozenset(
    {
        "format_version",
        "base_architecture",
        "lazy_layers",
        "streaming_kv_heads",
        "sink_tokens",
        "window_tokens",
    }
)
# Keys the converter records for provenance (convert.report.provenance, and
# eval.runner's evaluation_variant): kept in ``extra``, never read.
PROVENANCE_KEYS = frozenset(
    {
        "converter",
        "method",
        "source",
        "settings",
        "selection",
        "scores",
        "lazy_frequency",
        "evaluation_variant",
    }
)
# Any other key must start with this: free provenance, kept and never read.
FREE_PREFIX = "x_"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(key: Any) -> str:
    return f"{SECTION}.{key}" if isinstance(key, str) else f"{SECTION}[{key!r}]"


class LightTransferConfigError(ValueError):
    """A converted model's ``lighttransfer`` section is invalid."""


@dataclass(frozen=True)
class LightTransferConfig:
    lazy_layers: tuple[int, ...]
    sink_tokens: int
    window_tokens: int
    base_architecture: str
    num_hidden_layers: int
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # Per layer, the KV heads that stream besides whole lazy layers (format
    # 2); None: the folder streams whole layers only.
    streaming_kv_heads: tuple[tuple[int, ...], ...] | None = None
    # num_key_value_heads of the model (0: unknown; needed with streaming_kv_heads)
    num_kv_heads: int = 0

    @property
    def architecture(self) -> str:
        return SUPPORTED_BASES[self.base_architecture]

    @property
    def lazy_fraction(self) -> float:
        """Fraction of the model's KV heads that stream (whole lazy layers count all)."""
        if self.streaming_kv_heads is None or not self.num_kv_heads:
            return len(self.lazy_layers) / self.num_hidden_layers
        return self.num_streaming_kv_heads / (self.num_hidden_layers * self.num_kv_heads)

    @property
    def num_streaming_kv_heads(self) -> int:
        """(layer, KV head) pairs that stream, whole lazy layers included (0 if unknown)."""
        return sum(len(self.streaming_heads(i)) for i in range(self.num_hidden_layers))

    def is_lazy(self, layer_idx: int) -> bool:
        """Every KV head of ``layer_idx`` streams."""
        if layer_idx in self.lazy_layers:
            return True
        heads = self.streaming_heads(layer_idx)
        return bool(heads) and len(heads) == self.num_kv_heads

    def streaming_heads(self, layer_idx: int) -> tuple[int, ...]:
        """The KV heads of ``layer_idx`` that stream: all for a lazy layer."""
        if layer_idx in self.lazy_layers:
            return tuple(range(self.num_kv_heads)) if self.num_kv_heads else ()
        if self.streaming_kv_heads is None or not 0 <= layer_idx < len(self.streaming_kv_heads):
            return ()
        return self.streaming_kv_heads[layer_idx]

    @property
    def split_layers(self) -> tuple[int, ...]:
        """Layers where some KV heads stream and others attend fully."""
        if self.streaming_kv_heads is None:
            return ()
        return tuple(
            i
            for i in range(self.num_hidden_layers)
            if 0 < len(self.streaming_heads(i)) < self.num_kv_heads
        )

    def describe(self) -> str:
        """One line: what streams, e.g. "45 of 90 KV heads stream (sink 4, window 1020)"."""
        if self.streaming_kv_heads is not None and self.num_kv_heads:
            what = (f"{self.num_streaming_kv_heads} of "
                    f"{self.num_hidden_layers * self.num_kv_heads} KV heads stream")
        else:
            what = (f"{len(self.lazy_layers)} of {self.num_hidden_layers} layers lazy "
                    f"{list(self.lazy_layers)}")
        return f"{what} (sink {self.sink_tokens}, window {self.window_tokens})"

    @property
    def format_version(self) -> int:
        """The lowest format that expresses this config."""
        return PER_HEAD_VERSION if self.streaming_kv_heads is not None else 1

    def check_architecture(self, architecture: str) -> None:
        """Raise if ``architecture`` (one of ours) wraps another base than the section's."""
        if (
            isinstance(architecture, str)
            and architecture in ARCHITECTURES
            and ARCHITECTURES[architecture] != self.base_architecture
        ):
            raise LightTransferConfigError(
                f"{SECTION}.base_architecture={self.base_architecture!r} does not match "
                f"the architecture {architecture!r}; expected "
                f"{ARCHITECTURES[architecture]!r}"
            )

    def to_section(self) -> dict[str, Any]:
        section = dict(self.extra)
        section.update(
            format_version=self.format_version,
            base_architecture=self.base_architecture,
            lazy_layers=list(self.lazy_layers),
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
        )
        if self.streaming_kv_heads is not None:
            section["streaming_kv_heads"] = [list(h) for h in self.streaming_kv_heads]
        return section

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "LightTransferConfig":
        """Read the section from a transformers config object or a dict."""
        if isinstance(hf_config, Mapping):
            getter = hf_config.get
        else:
            def getter(key: str, default: Any = None) -> Any:
                return getattr(hf_config, key, default)

        section = getter(SECTION)
        if section is None:
            raise LightTransferConfigError(
                f"config.json has no '{SECTION}' section; convert the model with "
                "'lighttransfer convert SRC OUT' first"
            )
        if not isinstance(section, Mapping):
            raise LightTransferConfigError(
                f"{SECTION}: expected an object, got {type(section).__name__}"
            )
        num_layers = getter("num_hidden_layers")
        if not _is_int(num_layers) or num_layers < 1:
            raise LightTransferConfigError(
                f"num_hidden_layers={num_layers!r}: expected an integer >= 1"
            )
        base = section.get("base_architecture")
        if base is None:
            archs = getter("architectures") or []
            if not isinstance(archs, (list, tuple)):
                raise LightTransferConfigError(
                    f"architectures={archs!r}: expected a list of architecture names"
                )
            base = next(
                (ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in ARCHITECTURES),
                None,
            )
            if base is None:
                raise LightTransferConfigError(
                    f"{SECTION}.base_architecture is missing and architectures={archs!r} "
                    f"names none of ours; expected one of {', '.join(sorted(ARCHITECTURES))}"
                )
        num_kv_heads = getter("num_key_value_heads") or getter("num_attention_heads")
        return cls.validate(section, num_layers, base, num_kv_heads=num_kv_heads)

    @classmethod
    def validate(
        cls,
        section: Mapping[str, Any],
        num_hidden_layers: int,
        base: str | None,
        num_kv_heads: int | None = None,
    ) -> "LightTransferConfig":
        if not isinstance(section, Mapping):
            raise LightTransferConfigError(
                f"{SECTION}: expected an object, got {type(section).__name__}"
            )
        cls._check_format(section)
        if not isinstance(base, str) or base not in SUPPORTED_BASES:
            raise LightTransferConfigError(
                f"{SECTION}.base_architecture={base!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_BASES))}"
            )
        for key in ("lazy_layers", "sink_tokens", "window_tokens"):
            if key not in section:
                raise LightTransferConfigError(f"{SECTION}.{key} is missing")

        layers = section["lazy_layers"]
        if not isinstance(layers, (list, tuple)) or not all(_is_int(i) for i in layers):
            raise LightTransferConfigError(
                f"{SECTION}.lazy_layers={layers!r}: expected a list of integers "
                f"in [0, {num_hidden_layers - 1}]"
            )
        bad = [i for i in layers if not 0 <= i < num_hidden_layers]
        if bad:
            raise LightTransferConfigError(
                f"{SECTION}.lazy_layers contains {bad}: indices must be in "
                f"[0, {num_hidden_layers - 1}] (num_hidden_layers={num_hidden_layers})"
            )
        dup = sorted({i for i in layers if list(layers).count(i) > 1})
        if dup:
            raise LightTransferConfigError(
                f"{SECTION}.lazy_layers repeats {dup}: indices must be unique"
            )

        sink = section["sink_tokens"]
        if not _is_int(sink) or sink < 0:
            raise LightTransferConfigError(
                f"{SECTION}.sink_tokens={sink!r}: expected an integer >= 0"
            )
        window = section["window_tokens"]
        if not _is_int(window) or window < 1:
            raise LightTransferConfigError(
                f"{SECTION}.window_tokens={window!r}: expected an integer >= 1"
            )
        heads = cls._check_streaming_kv_heads(section, num_hidden_layers, num_kv_heads)
        extra = {k: v for k, v in section.items() if k not in SEMANTIC_KEYS}
        return cls(
            lazy_layers=tuple(sorted(layers)),
            sink_tokens=sink,
            window_tokens=window,
            base_architecture=base,
            num_hidden_layers=num_hidden_layers,
            extra=extra,
            streaming_kv_heads=heads,
            num_kv_heads=num_kv_heads if _is_int(num_kv_heads) and num_kv_heads > 0 else 0,
        )

    @staticmethod
    def _check_streaming_kv_heads(
        section: Mapping[str, Any], num_hidden_layers: int, num_kv_heads: Any
    ) -> tuple[tuple[int, ...], ...] | None:
        if "streaming_kv_heads" not in section:
            return None
        key = f"{SECTION}.streaming_kv_heads"
        version = section.get("format_version", 1)
        if version < PER_HEAD_VERSION:
            raise LightTransferConfigError(
                f"{key} needs {SECTION}.format_version >= {PER_HEAD_VERSION} "
                f"(got {version}): a plugin of format {version} would ignore it"
            )
        if not _is_int(num_kv_heads) or num_kv_heads < 1:
            raise LightTransferConfigError(
                f"{key}: num_key_value_heads={num_kv_heads!r} in config.json: expected an "
                "integer >= 1 to check the head indices against"
            )
        value = section["streaming_kv_heads"]
        if not isinstance(value, (list, tuple)) or len(value) != num_hidden_layers:
            got = f"{len(value)} entries" if isinstance(value, (list, tuple)) else repr(value)
            raise LightTransferConfigError(
                f"{key}: expected a list with one entry per layer ({num_hidden_layers}), "
                f"each a list of KV head indices in [0, {num_kv_heads - 1}]; got {got}"
            )
        out = []
        for layer, entry in enumerate(value):
            if not isinstance(entry, (list, tuple)) or not all(_is_int(h) for h in entry):
                raise LightTransferConfigError(
                    f"{key}[{layer}]={entry!r}: expected a list of KV head indices "
                    f"in [0, {num_kv_heads - 1}]"
                )
            bad = [h for h in entry if not 0 <= h < num_kv_heads]
            if bad:
                raise LightTransferConfigError(
                    f"{key}[{layer}] (layer {layer}) contains {bad}: KV head indices must be "
                    f"in [0, {num_kv_heads - 1}] (num_key_value_heads={num_kv_heads})"
                )
            if list(entry) != sorted(set(entry)):
                raise LightTransferConfigError(
                    f"{key}[{layer}]={list(entry)!r} (layer {layer}): KV head indices "
                    "must be sorted and unique"
                )
            out.append(tuple(entry))
        return tuple(out)

    @staticmethod
    def _check_format(section: Mapping[str, Any]) -> None:
        """``format_version`` first (a newer folder gets the upgrade hint), then unknown keys."""
        version = section.get("format_version", 1)
        if not _is_int(version) or version < 1:
            raise LightTransferConfigError(
                f"{SECTION}.format_version={version!r}: expected an integer in "
                f"[1, {FORMAT_VERSION}]"
            )
        if version > FORMAT_VERSION:
            raise LightTransferConfigError(
                f"{SECTION}.format_version={version}: this folder was written by a newer "
                f"converter; this vllm-lighttransfer reads format_version in "
                f"[1, {FORMAT_VERSION}]: upgrade vllm-lighttransfer to serve it"
            )
        unknown = sorted(
            (
                k
                for k in section
                if not (isinstance(k, str) and k.startswith(FREE_PREFIX))
                and k not in SEMANTIC_KEYS
                and k not in PROVENANCE_KEYS
            ),
            key=repr,
        )
        if unknown:
            raise LightTransferConfigError(
                f"{', '.join(_field(k) for k in unknown)}: unknown "
                f"{'key' if len(unknown) == 1 else 'keys'} (format_version {version}); "
                "it may change attention, so the folder is refused rather than served "
                f"with today's semantics. Known: {', '.join(sorted(SEMANTIC_KEYS | PROVENANCE_KEYS))}"
                f"; free provenance keys start with {FREE_PREFIX!r}. If a newer converter "
                "wrote it, upgrade vllm-lighttransfer"
            )


def kv_bytes_ratio(
    cfg: LightTransferConfig, context_tokens: int, block_size: int = 1
) -> float:
    """Steady-state KV memory per request, converted / unconverted.

    A lazy layer holds the sink blocks plus the window blocks plus one block
    for a window that does not start on a block boundary; a full layer holds
    every block of the context. With ``block_size=1`` this is the paper's
    ``1 - lazy_fraction * (1 - (sink + window) / context)``. Per KV head
    (``streaming_kv_heads``) the same formula counts KV heads in place of
    layers.
    """
    full_blocks = -(-context_tokens // block_size)
    lazy_blocks = min(
        full_blocks,
        -(-cfg.sink_tokens // block_size)
        + -(-cfg.window_tokens // block_size)
        + (1 if block_size > 1 else 0),
    )
    if cfg.streaming_kv_heads is not None and cfg.num_kv_heads:
        units = cfg.num_hidden_layers * cfg.num_kv_heads
        n_lazy = sum(len(cfg.streaming_heads(i)) for i in range(cfg.num_hidden_layers))
    else:
        units = cfg.num_hidden_layers
        n_lazy = len(cfg.lazy_layers)
    return ((units - n_lazy) * full_blocks + n_lazy * lazy_blocks) / (units * full_blocks)


class LightTransferConfigCheck:
    """vLLM per-architecture config hook (``MODELS_CONFIG_MAP``): validate early.

    vLLM calls ``verify_and_update_model_config`` while it builds its
    ``ModelConfig``; ``verify_and_update_config`` once the whole config exists.
    Duck-typed on vLLM's ``VerifyAndUpdateConfig`` so this module needs no vLLM.
    """

    @staticmethod
    def verify_and_update_model_config(model_config: Any) -> None:
        cfg = LightTransferConfig.from_hf_config(model_config.hf_config)
        archs = getattr(model_config.hf_config, "architectures", None) or []
        if not isinstance(archs, (list, tuple)):
            raise LightTransferConfigError(
                f"architectures={archs!r}: expected a list of architecture names"
            )
        for arch in archs:
            cfg.check_architecture(arch)

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        return None
