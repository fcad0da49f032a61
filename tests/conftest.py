"""Shared fixtures: a tiny random Llama saved as a local HF directory with a word tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

VOCAB = 128


def tiny_llama(
    layers: int = 2, hidden: int = 64, seed: int = 0, **config: object
) -> PreTrainedModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{
            "vocab_size": VOCAB,
            "hidden_size": hidden,
            "intermediate_size": hidden * 3 // 2,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "tie_word_embeddings": True,
            **config,
        }
    )
    return LlamaForCausalLM(cfg).eval()


def word_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    # A skewed word distribution gives the inputs some structure (non-isotropic Hessians).
    return " ".join(f"w{min(int(rng.expovariate(0.05)) + 3, VOCAB - 1)}" for _ in range(n_words))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(directory, safe_serialization=True)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="w2")
    tok.save_pretrained(directory)
    (directory / "calib.txt").write_text(word_text(6000, seed=1))
    (directory / "eval.txt").write_text(word_text(3000, seed=2))
    return directory
