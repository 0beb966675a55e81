"""Tiny random Llama models with a real tokenizer, built locally (no hub).

What it does
    ``build_tiny_llama(path)`` writes a transformers Llama folder (config,
    safetensors weights, fast tokenizer with a chat template) small enough for
    tests and CPU benchmarks. Weights are random but drawn with a wide
    ``initializer_range`` so greedy decoding has clear winners: tests that
    compare token streams then fail on real differences, not on ties.
    Imports no vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = 500  # word tokens "w0" .. "w499" plus 4 specials

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ":": 3}
    for i in range(WORDS):
        vocab[f"w{i}"] = len(vocab)
    for word in ("user", "assistant", "system"):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def build_tiny_llama(
    path: str | Path,
    num_layers: int = 4,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    max_position_embeddings: int = 4096,
    initializer_range: float = 0.2,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a tiny random LlamaForCausalLM to ``path`` (idempotent)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists() and (path / "model.safetensors").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer(path)
    vocab_size = len(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"])
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    return path
