"""LightTransfer configuration: the ``lighttransfer`` section of config.json.

What it does
    Parses and validates the section a converted model folder carries, and
    maps our architecture names to the stock ones they wrap. Imports no vLLM,
    so it tests in milliseconds and the converter can use it without vLLM.

Format (config.json)
    "architectures": ["LightTransferLlamaForCausalLM"],
    "lighttransfer": {
        "format_version": 1,          # FORMAT_VERSION of the converter that wrote it
        "base_architecture": "LlamaForCausalLM",
        "lazy_layers": [1, 3, 5],     # decoder layer indices with streaming attention
        "sink_tokens": 4,             # initial tokens every lazy layer keeps
        "window_tokens": 1020,        # recent tokens every lazy layer keeps
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
    existed stay servable.

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
FORMAT_VERSION = 1

# Keys that decide what attention computes; each is validated below.
SEMANTIC_KEYS = frozenset(
    {"format_version", "base_architecture", "lazy_layers", "sink_tokens", "window_tokens"}
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

    @property
    def architecture(self) -> str:
        return SUPPORTED_BASES[self.base_architecture]

    @property
    def lazy_fraction(self) -> float:
        return len(self.lazy_layers) / self.num_hidden_layers

    def is_lazy(self, layer_idx: int) -> bool:
        return layer_idx in self.lazy_layers

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
            format_version=FORMAT_VERSION,
            base_architecture=self.base_architecture,
            lazy_layers=list(self.lazy_layers),
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
        )
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
        return cls.validate(section, num_layers, base)

    @classmethod
    def validate(
        cls, section: Mapping[str, Any], num_hidden_layers: int, base: str | None
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
        extra = {k: v for k, v in section.items() if k not in SEMANTIC_KEYS}
        return cls(
            lazy_layers=tuple(sorted(layers)),
            sink_tokens=sink,
            window_tokens=window,
            base_architecture=base,
            num_hidden_layers=num_hidden_layers,
            extra=extra,
        )

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
    ``1 - lazy_fraction * (1 - (sink + window) / context)``.
    """
    full_blocks = -(-context_tokens // block_size)
    lazy_blocks = min(
        full_blocks,
        -(-cfg.sink_tokens // block_size)
        + -(-cfg.window_tokens // block_size)
        + (1 if block_size > 1 else 0),
    )
    n_lazy = len(cfg.lazy_layers)
    n_full = cfg.num_hidden_layers - n_lazy
    return (n_full * full_blocks + n_lazy * lazy_blocks) / (
        cfg.num_hidden_layers * full_blocks
    )


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
