"""vllm-lighttransfer: LightTransfer (arXiv 2410.13846) as a vLLM plugin.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls it in
every process, possibly several times; it is idempotent and cheap: model
classes are registered by import string (loaded only when a converted model is
served), and the attention backend and KV cache spec are registered once.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register our architectures, attention backend and KV cache spec with vLLM."""
    global _registered
    if _registered:
        return

    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from vllm_lighttransfer.config import ARCHITECTURES

    supported = ModelRegistry.get_supported_archs()
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, f"vllm_lighttransfer.model:{arch}")

    # Validate the lighttransfer section when vLLM builds its ModelConfig (in
    # the API server, before any engine starts), through vLLM's per-arch
    # config hook table, so a bad value is one clear error at config load.
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_lighttransfer.config import LightTransferConfigCheck

    for arch in ARCHITECTURES:
        MODELS_CONFIG_MAP.setdefault(arch, LightTransferConfigCheck)

    from vllm_lighttransfer.attention.backend import BACKEND_NAME

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(
            BACKEND_NAME,
            "vllm_lighttransfer.attention.backend.SinkWindowAttentionBackend",
        )

    # Built-in specs first: _ensure_registered() is a no-op once the registry
    # holds anything, so registering ours first would hide vLLM's own.
    KVCacheSpecRegistry._ensure_registered()
    from vllm_lighttransfer.kv_cache import SinkWindowManager, SinkWindowSpec

    KVCacheSpecRegistry.register(
        SinkWindowSpec, SinkWindowManager, uniform_type_base_spec=SinkWindowSpec
    )
    _registered = True
