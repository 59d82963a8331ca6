"""Shared fixtures: a tiny tokenizer and a tiny seeded Llama-style teacher, built in process.

``tiny_tokenizer``: byte-level BPE trained on a few sentences (~300 ids) with ``<pad>``, ``<eos>``
and chat role tokens, and a simple chat template
``<|role|>content<|end|>`` (generation prompt ``<|assistant|>``).
``tiny_teacher_dir``: a saved HF directory (model + tokenizer). The model's output layer is padded
to ``TINY_PADDED_VOCAB`` rows, more than the tokenizer has, like real teachers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

TINY_PADDED_VOCAB = 320
TINY_SPECIALS = ["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher model writes soft labels once; many students learn from them later.",
    "Hello world! How are you today? I am fine, thank you.",
    "Sparse targets keep the top k token ids and their log probabilities.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ( ) [ ] { }",
]


def build_tiny_tokenizer(vocab_size: int = 300) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token=None
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int = TINY_PADDED_VOCAB, seed: int = 0, **overrides: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,  # spread-out logits: distinct top-k, non-trivial entropy
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Path:
    path = tmp_path_factory.mktemp("tiny_teacher")
    build_tiny_llama().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
