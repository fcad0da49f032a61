"""Models read block by block (issue 17): the same checkpoint, bytes and all, as a model
loaded whole, with never more than the block at work (and the next, for steps that ask)
in memory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compensator import api
from compensator.errors import CompensatorError, RunInterrupted
from compensator.io.streamed import in_memory, write_streamed
from compensator.models.lazy import LazyWeights, has_meta_tensors
from compensator.pipeline.resume import RunState
from conftest import tiny_llama
from test_moe import qwen3_moe

CALIB = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(3))


def _model_dir(tmp_path: Path, tiny_dir: Path, model: nn.Module | None = None) -> Path:
    directory = tmp_path / "model"
    (model or tiny_llama(layers=4, seed=5)).save_pretrained(directory, safe_serialization=True)
    for f in tiny_dir.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".txt":
            (directory / f.name).write_bytes(f.read_bytes())
    return directory


def _saved_bytes(qm: api.QuantizedModel, out: Path) -> bytes:
    api.save(qm, out)
    return (out / "model.safetensors").read_bytes()


def _one_block_at_a_time(monkeypatch: pytest.MonkeyPatch, peaks: list[int]) -> None:
    """Record, at every block forward, how many blocks hold real weights."""
    real = api.get_adapter

    def adapter(model: nn.Module) -> object:
        a = real(model)
        blocks = a.blocks(model)

        def hook(*_: object) -> None:
            peaks.append(sum(not has_meta_tensors(b) for b in blocks))

        for b in blocks:
            b.register_forward_pre_hook(hook)
        return a

    monkeypatch.setattr(api, "get_adapter", adapter)


def test_streamed_writer_matches_safetensors_bytes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 4, generator=g),
        "q": torch.randint(0, 9, (2, 3), dtype=torch.int32, generator=g),
        "h": torch.randn(5, generator=g).to(torch.bfloat16),
        "f": torch.randn(7, generator=g).half(),
        "u": torch.tensor([1, 2], dtype=torch.uint8),
        "i": torch.arange(3),
        "s": torch.tensor(2.0),
        "e": torch.zeros(0, 3),
    }
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    write_streamed(
        tmp_path / "b.safetensors", {k: in_memory(v) for k, v in tensors.items()}, {"format": "pt"}
    )
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("recipe", "kw", "most"),
    [
        ("gptq", {"bits": 3, "group_size": 16}, 1),
        ("gptaq-exact", {"bits": 3, "group_size": 16}, 1),
        ("sde-cll", {"epochs": 1}, 2),  # trains against the next block: two at once
    ],
)
def test_lazy_checkpoint_is_byte_identical_to_a_whole_load(
    recipe: str,
    kw: dict,
    most: int,
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _model_dir(tmp_path, tiny_dir)
    common = dict(calibration=CALIB, progress=False, batch_size=2, **kw)
    whole = api.quantize(str(model), recipe, **common)
    assert not has_meta_tensors(whole.model)
    peaks: list[int] = []
    _one_block_at_a_time(monkeypatch, peaks)
    lazy = api.quantize(str(model), recipe, resume=tmp_path / "state", **common)
    monkeypatch.undo()
    assert peaks and max(peaks) == most, peaks
    # Every block went back to the meta device once written; only the embeddings, final
    # norm and head are in memory.
    assert all(has_meta_tensors(b) for b in lazy.model.model.layers)
    with pytest.raises(CompensatorError, match="block by block"):
        api.evaluate(lazy, data="embedded", windows=1, seqlen=16, progress=False)
    assert _saved_bytes(lazy, tmp_path / "lazy") == _saved_bytes(whole, tmp_path / "whole")
    config = json.loads((tmp_path / "lazy" / "config.json").read_text())
    assert config == json.loads((tmp_path / "whole" / "config.json").read_text())
    loaded = api.load(tmp_path / "lazy")
    ids = CALIB[:1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, whole.model(ids).logits, rtol=0, atol=0)


def test_lazy_run_resumes_to_the_same_bytes(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model_dir(tmp_path, tiny_dir)
    common = dict(calibration=CALIB, progress=False, batch_size=2, bits=3, group_size=16)
    whole = api.quantize(str(model), "gptaq-exact", **common)
    real = RunState.save_block
    saved: list[int] = []

    def save_then_stop(self: RunState, index: int, *args: object, **kw: object) -> None:
        real(self, index, *args, **kw)  # type: ignore[arg-type]
        saved.append(index)
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunState, "save_block", save_then_stop)
    with pytest.raises(RunInterrupted):
        api.quantize(str(model), "gptaq-exact", resume=tmp_path / "state", **common)
    monkeypatch.undo()
    again = api.quantize(str(model), "gptaq-exact", resume=tmp_path / "state", **common)
    assert again.report["blocks"] == 4 and has_meta_tensors(again.model)
    assert _saved_bytes(again, tmp_path / "lazy") == _saved_bytes(whole, tmp_path / "whole")


def test_renamed_tensors_fall_back_to_a_whole_load(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model_dir(tmp_path, tiny_dir)
    weights = model / "model.safetensors"
    state = load_file(str(weights))
    # A tensor under another name: not readable block by block, and (transformers would fill
    # the missing one with random values) refused by the whole load too.
    assert LazyWeights(model, torch.float32).mismatch(tiny_llama(layers=4, seed=5)) is None
    state["model.norm.extra"] = torch.zeros(1)
    del state["model.norm.weight"]
    save_file(state, str(weights))
    lacks = r"lacks tensors of its config.json's model, such as model.norm.weight \(1 in all"
    with caplog.at_level(logging.INFO), pytest.raises(CompensatorError, match=lacks):
        api.quantize(str(model), "gptq", calibration=CALIB, progress=False, resume=tmp_path / "s")
    assert "(model.norm.weight is not in the files); loading it whole" in caplog.text


def test_lazy_moe_reads_per_expert_tensors(tiny_dir: Path, tmp_path: Path) -> None:
    model = _model_dir(tmp_path, tiny_dir, qwen3_moe())
    common = dict(calibration=CALIB, progress=False, batch_size=2, group_size=16)
    whole = api.quantize(str(model), "gptq", **common)
    lazy = api.quantize(str(model), "gptq", resume=tmp_path / "state", **common)
    assert has_meta_tensors(lazy.model)  # read block by block, not loaded whole
    assert _saved_bytes(lazy, tmp_path / "lazy") == _saved_bytes(whole, tmp_path / "whole")


def test_files_a_model_cannot_read_tensor_by_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    model = _model_dir(tmp_path, tiny_dir)
    weights = LazyWeights(model, torch.float32)
    meta = api.load_model(str(model), lazy=True).model
    assert weights.mismatch(meta) is None
    meta.config.quantization_config = {"quant_method": "fp8"}
    assert "quantization_config" in (weights.mismatch(meta) or "")
    state = load_file(str(model / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.weight_scale_inv"] = torch.ones(1)
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(
        torch.float8_e4m3fn
    )
    save_file(state, str(model / "model.safetensors"))
    weights = LazyWeights(model, torch.float32)
    meta = api.load_model(str(model), lazy=True).model
    assert "up_proj.weight is F8_E4M3" in (weights.mismatch(meta) or "")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].float()
    save_file(state, str(model / "model.safetensors"))
    meta = api.load_model(str(model), lazy=True).model
    why = LazyWeights(model, torch.float32).mismatch(meta) or ""
    assert "files hold model.layers.0.mlp.down_proj.weight_scale_inv" in why


def test_a_changed_state_is_refused_at_save(tiny_dir: Path, tmp_path: Path) -> None:
    model = _model_dir(tmp_path, tiny_dir)
    lazy = api.quantize(str(model), "rtn", progress=False, resume=tmp_path / "state")
    block = tmp_path / "state" / "block-00002.safetensors"
    block.write_bytes(block.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CompensatorError, match=r"block 2 .* changed since"):
        api.save(lazy, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_lazy_needs_a_state_and_a_directory(tiny_dir: Path, tmp_path: Path) -> None:
    model = _model_dir(tmp_path, tiny_dir)
    with pytest.raises(CompensatorError, match="resume=DIR"):
        api.quantize(str(model), "gptq", calibration=CALIB, progress=False, lazy=True)
    with pytest.raises(CompensatorError, match="whole-model transforms"):
        api.quantize(
            str(model), "quarot-rtn", calibration=CALIB, progress=False, lazy=True,
            resume=tmp_path / "s",
        )  # fmt: skip
