"""Shared fixtures: a tiny random Llama saved as a local HF directory with a word tokenizer."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

VOCAB = 128

# scripts/test.sh (the README's test command, and CI's) sets this: there a missing model or
# data set fails the tests that need it instead of skipping them.
REQUIRE_ALL = os.environ.get("COMPENSATOR_REQUIRE_ALL") == "1"


def require(condition: bool, why: str) -> None:
    """Skip a test whose prerequisite is missing, or fail it under scripts/test.sh."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"{why} (scripts/test.sh runs every test: install it, see README)")
    pytest.skip(why)


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


def tiny_qwen2(hidden: int = 96) -> PreTrainedModel:
    """A tiny Qwen2: grouped-query attention with q/k/v biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 3 // 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


def first_block(model: torch.nn.Module, spec: object, vq: object = None):
    """Block 0 of ``model`` with what a learner sees: (block, Linear names, LearnContext,
    BlockContext) for 4 random windows of 16 tokens, in 2 batches."""
    from compensator.learn.blockwise import learn_context
    from compensator.models.adapter import get_adapter
    from compensator.pipeline.context import block_context
    from compensator.pipeline.passes import fp_pass
    from compensator.pipeline.storage import Storage
    from compensator.pipeline.streams import Stream, capture_block_inputs

    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(7))
    cpu = torch.device("cpu")
    storage = Storage(cpu)
    hidden, kwargs = capture_block_inputs(
        model, blocks, ids, batch_size=2, device=cpu, storage=storage
    )
    block = blocks[0]
    linears = adapter.linears(block)
    stream = Stream(hidden, kwargs[0])
    fp_in, fp_out = fp_pass(block, list(linears), stream, cpu, storage)
    ctx = block_context(
        0, blocks, block, linears, adapter.arch.rotation, stream, stream, fp_out, fp_in,
        kwargs[1], cpu, storage,
    )  # fmt: skip
    return block, list(linears), learn_context(ctx, spec, vq), ctx


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


def model_dir_like(tiny_dir: Path, directory: Path, **model: Any) -> Path:
    """A saved ``tiny_llama(**model)`` in ``directory`` with ``tiny_dir``'s tokenizer and texts."""
    tiny_llama(**model).save_pretrained(directory, safe_serialization=True)
    for f in tiny_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".txt":
            (directory / f.name).write_bytes(f.read_bytes())
    return directory


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any model load, for errors that must come before it."""
    calls: list[str] = []

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        raise AssertionError(f"model {name} loaded before the argument error")

    import compensator.api
    import compensator.io.targets

    monkeypatch.setattr(compensator.api, "load_model", refuse)
    monkeypatch.setattr(compensator.io.targets, "load_model", refuse)
    return calls
