"""LightTransfer configuration: the ``lighttransfer`` section of config.json.

What it does
    Parses and validates the section a converted model folder carries, and
    maps our architecture names to the stock ones they wrap. Imports no vLLM,
    so it tests in milliseconds and the converter can use it without vLLM.

Format (config.json)
    "architectures": ["LightTransferLlamaForCausalLM"],
    "lighttransfer": {
        "base_architecture": "LlamaForCausalLM",
        "lazy_layers": [1, 3, 5],     # decoder layer indices with streaming attention
        "sink_tokens": 4,             # initial tokens every lazy layer keeps
        "window_tokens": 1020,        # recent tokens every lazy layer keeps
        ...                            # provenance (scores, settings), ignored here
    }

Constraints
    Indices unique and in ``[0, num_hidden_layers)``, ``sink_tokens >= 0``,
    ``window_tokens >= 1``, base architecture one of ``SUPPORTED_BASES``.
    Every error names the field, the value and the allowed range.

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
        if architecture in ARCHITECTURES and ARCHITECTURES[architecture] != self.base_architecture:
            raise LightTransferConfigError(
                f"{SECTION}.base_architecture={self.base_architecture!r} does not match "
                f"the architecture {architecture!r}; expected "
                f"{ARCHITECTURES[architecture]!r}"
            )

    def to_section(self) -> dict[str, Any]:
        section = dict(self.extra)
        section.update(
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
        num_layers = getter("num_hidden_layers")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise LightTransferConfigError(
                f"num_hidden_layers={num_layers!r}: expected an integer >= 1"
            )
        base = section.get("base_architecture")
        if base is None:
            archs = getter("architectures") or []
            base = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        return cls.validate(section, num_layers, base)

    @classmethod
    def validate(
        cls, section: Mapping[str, Any], num_hidden_layers: int, base: str | None
    ) -> "LightTransferConfig":
        if not isinstance(section, Mapping):
            raise LightTransferConfigError(
                f"{SECTION}: expected an object, got {type(section).__name__}"
            )
        if base not in SUPPORTED_BASES:
            raise LightTransferConfigError(
                f"{SECTION}.base_architecture={base!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_BASES))}"
            )
        for key in ("lazy_layers", "sink_tokens", "window_tokens"):
            if key not in section:
                raise LightTransferConfigError(f"{SECTION}.{key} is missing")

        layers = section["lazy_layers"]
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers
        ):
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
        if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
            raise LightTransferConfigError(
                f"{SECTION}.sink_tokens={sink!r}: expected an integer >= 0"
            )
        window = section["window_tokens"]
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise LightTransferConfigError(
                f"{SECTION}.window_tokens={window!r}: expected an integer >= 1"
            )
        extra = {
            k: v
            for k, v in section.items()
            if k not in ("lazy_layers", "sink_tokens", "window_tokens", "base_architecture")
        }
        return cls(
            lazy_layers=tuple(sorted(layers)),
            sink_tokens=sink,
            window_tokens=window,
            base_architecture=base,
            num_hidden_layers=num_hidden_layers,
            extra=extra,
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
        for arch in getattr(model_config.hf_config, "architectures", None) or []:
            cfg.check_architecture(arch)

    @staticmethod
    def verify_and_update_config(vllm_config: Any) -> None:
        return None
