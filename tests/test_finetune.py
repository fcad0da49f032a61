"""``finetune``: the loss against brute force, what trains (and only that), a run that lowers
KL and saves a checkpoint that loads and exports, resume after an interrupt, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

import compensator as cp
from compensator.api_tune import finetune
from compensator.cli import main
from compensator.errors import CompensatorError
from compensator.nn import QuantLinear
from compensator.quant.spec import QuantSpec
from compensator.tune.loop import Schedule, batch_rows
from compensator.tune.parts import attach, commit
from compensator.tune.spec import TuneConfig, parse_parts
from compensator.tune.state import TuneState
from compensator.tune.teacher import topk_kl, topk_targets
from compensator.tune.windows import free_windows
from conftest import VOCAB, model_dir_like

SMALL = {"windows": 8, "seqlen": 32, "epochs": 2, "save_every": 3}


# -- the loss -----------------------------------------------------------------------------


def _full_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(teacher[:, :-1].double(), -1)
    q = torch.log_softmax(student[:, :-1].double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean()


def _bucket_kl(teacher: torch.Tensor, student: torch.Tensor, k: int) -> torch.Tensor:
    """KL of the (k+1)-bucket distributions, by brute force in float64, position by position."""
    p = torch.softmax(teacher[:, :-1].double(), -1).reshape(-1, teacher.shape[-1])
    q = torch.softmax(student[:, :-1].double(), -1).reshape(-1, teacher.shape[-1])
    total = torch.zeros((), dtype=torch.float64)
    for pi, qi in zip(p, q, strict=True):
        top = pi.argsort(descending=True)[:k]
        mask = torch.zeros_like(pi, dtype=torch.bool)
        mask[top] = True
        pb = torch.cat([pi[top], pi[~mask].sum()[None]])
        qb = torch.cat([qi[top], qi[~mask].sum()[None]])
        total += (pb * (pb / qb).log()).sum()
    return total / p.shape[0]


def test_topk_kl_is_the_full_kl_when_k_is_the_vocabulary() -> None:
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 9, 50, generator=g) * 3, torch.randn(2, 9, 50, generator=g) * 3
    loss = topk_kl(s, *topk_targets(t, 50))
    assert loss.item() == pytest.approx(_full_kl(t, s).item(), rel=1e-5)


def test_topk_kl_is_the_kl_of_top_k_plus_the_rest() -> None:
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 7, 40, generator=g) * 2, torch.randn(2, 7, 40, generator=g) * 2
    loss = topk_kl(s, *topk_targets(t, 5))
    assert loss.item() == pytest.approx(_bucket_kl(t, s, 5).item(), rel=1e-5)
    assert 0 < loss.item() < _full_kl(t, s).item()  # a lower bound (log-sum inequality)
    assert topk_kl(t, *topk_targets(t, 5)).abs().item() < 1e-6  # zero at the teacher


# -- pieces ---------------------------------------------------------------------------------


def test_free_windows_overlap_no_taken_span() -> None:
    taken = [(5, 10), (40, 3), (97, 50)]
    starts = free_windows(120, 8, taken)
    busy = {i for s, n in taken for i in range(s, s + n)}
    expected = [s for s in range(0, 113, 8) if not busy & set(range(s, s + 8))]
    assert starts == expected and starts  # brute force


def test_schedule_and_data_order_depend_only_on_the_step() -> None:
    sched = Schedule(steps=20, batch_size=2, warmup=0.1)
    assert [round(sched.factor(i), 3) for i in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert sched.factor(19) < 0.01
    rows = [r for step in range(5) for r in batch_rows(step, 2, 5, seed=3)]
    assert sorted(rows[:5]) == list(range(5)) and sorted(rows[5:10]) == list(range(5))
    assert batch_rows(3, 2, 5, seed=3) == rows[6:8]


def test_parse_parts_refuses_unknown_names() -> None:
    assert parse_parts("norms, scales,norms") == ("norms", "scales")
    with pytest.raises(CompensatorError, match="unknown part codes"):
        parse_parts("scales,codes")


def test_each_layer_kind_declares_what_it_trains() -> None:
    plain = QuantLinear(64, 8, QuantSpec(bits=4, group_size=32))
    assert plain.trainable() == {"scales": ["scales"]}
    fmin = QuantLinear(64, 8, QuantSpec(bits=4, group_size=32, float_min=True), rank=4)
    assert fmin.trainable() == {
        "scales": ["scales"],
        "mins": ["zeros"],
        "lowrank": ["lr_a", "lr_b"],
    }
    kq = QuantLinear(256, 8, QuantSpec(kquant="Q4_K"), rank=2, factor_bits=8)
    assert kq.trainable() == {}  # 6-bit sub-scales and int8 factors: nothing trains exactly


def test_the_tuning_forward_is_the_stored_forward() -> None:
    """While tuning, the weight comes from broadcast group parameters (whole groups) or the
    general formula (ragged): both equal the reference forward (the dequantized weight) bit
    for bit."""
    g = torch.Generator().manual_seed(4)
    for width, spec in ((64, QuantSpec(bits=3, group_size=32)),
                        (80, QuantSpec(bits=4, group_size=32, float_min=True))):  # fmt: skip
        layer = QuantLinear(width, 8, spec)
        layer.qweight.copy_(torch.randint(0, 2**31 - 1, layer.qweight.shape, generator=g))
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=g).half() + 0.01)
        x = torch.randn(3, width, generator=g)
        with torch.no_grad():
            stored = torch.nn.functional.linear(x, layer.dequantize_weight())
            layer.tune(True)
            assert torch.equal(layer(x), stored)
            layer.tune(False)


# -- a tiny model, end to end --------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with peaked next-token distributions (large init): KL has room to fall."""
    return model_dir_like(tiny_dir, tmp_path_factory.mktemp("peaked"), initializer_range=0.2)


@pytest.fixture(scope="module")
def checkpoint(peaked: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    qm = cp.quantize(
        str(peaked), "gptq-l2qer", bits=3, group_size=32, rank=4, float_min=True,
        calibration=str(peaked / "calib.txt"), calib_windows=8, seqlen=32, progress=False,
    )  # fmt: skip
    return cp.save(qm, tmp_path_factory.mktemp("ck") / "w3")


def _eval(path: Path, peaked: Path) -> cp.evaluate:
    return cp.evaluate(str(path), data=str(peaked / "eval.txt"), seqlen=32, progress=False)


def test_gradients_reach_exactly_the_declared_tensors(checkpoint: Path) -> None:
    model = cp.load(checkpoint)
    codes = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    attached = attach(model, ("scales", "mins", "lowrank", "norms"), explicit=True)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        model(ids).logits.square().mean().backward()
    trained = {id(p) for ps in attached.groups.values() for p in ps}
    for name, p in model.named_parameters():
        if id(p) in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    counts = attached.count()
    layers = len(codes)
    assert counts["scales"] == sum(m.scales.numel() for m in model.modules()
                                   if isinstance(m, QuantLinear))  # fmt: skip
    assert len(attached.groups["lowrank"]) == 2 * layers and counts["mins"] == counts["scales"]
    commit(attached)
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.qweight, codes[n]) and m.scales.dtype == torch.float16


def test_the_model_trained_is_the_model_saved(checkpoint: Path, tmp_path: Path) -> None:
    """The straight-through rounding to each tensor's stored dtype: the forward while
    training equals, bit for bit, the forward of the committed, saved, reloaded model."""
    model = cp.load(checkpoint)
    attached = attach(model, ("scales", "lowrank", "norms"), explicit=True)
    with torch.no_grad():
        for p in (p for ps in attached.groups.values() for p in ps):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 1e-2)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        during = model(ids).logits
    commit(attached)
    from compensator.io.native import read_quantization_config, save_checkpoint

    qc = read_quantization_config(checkpoint)["quantization_config"]
    again = cp.load(save_checkpoint(model, qc, tmp_path / "c"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, during)


def test_finetune_lowers_kl_and_saves_a_checkpoint(
    checkpoint: Path, peaked: Path, tmp_path: Path
) -> None:
    # A tiny model over-fits 8 windows (train loss halves, eval KL rises): 32 windows.
    fast = {"scales": 3e-3, "mins": 3e-3, "norms": 3e-3, "lowrank": 3e-4}
    cfg = TuneConfig(data=str(peaked / "calib.txt"), **{**SMALL, "windows": 32}, lr=fast)
    out = finetune(checkpoint, tmp_path / "ft", cfg, progress=False)
    before, after = _eval(checkpoint, peaked), _eval(out, peaked)
    assert after.kl < 0.9 * before.kl, (before.kl, after.kl)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    record = qc["finetune"]
    assert set(record["trained"]) == {"scales", "mins", "lowrank", "norms"}
    assert record["steps"] == 64 and record["data"]["windows"] == 32
    assert record["loss_last_tenth"] < record["loss_first_tenth"]
    assert qc["bits_per_weight"] == pytest.approx(after.bits_per_weight)
    assert not (tmp_path / "ft.partial").exists()  # the state goes once the output is saved


def test_finetuned_checkpoint_exports_to_compressed_tensors(
    checkpoint: Path, peaked: Path, tmp_path: Path
) -> None:
    cfg = TuneConfig(data=str(peaked / "calib.txt"), train="scales,norms", **SMALL)
    qm = cp.quantize(
        str(peaked), "rtn", bits=4, group_size=32, progress=False,
    )  # fmt: skip
    base = cp.save(qm, tmp_path / "rtn")
    out = finetune(base, tmp_path / "ft", cfg, progress=False)
    ct = cp.export(out, tmp_path / "ct", format="compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(ct)
    ours, before = cp.load(out), cp.load(base)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = theirs(ids).logits, ours(ids).logits
        assert (a - b).abs().max() < 1e-3
        assert not torch.equal(b, before(ids).logits)  # the trained scales are what exported


def test_resume_after_an_interrupt_is_bit_identical(
    checkpoint: Path, peaked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = TuneConfig(data=str(peaked / "calib.txt"), **SMALL)
    whole = finetune(checkpoint, tmp_path / "whole", cfg, progress=False)
    saves: list[int] = []
    original = TuneState.save_step

    def save_then_stop(self: TuneState, step: int, *args: object, **kw: object) -> None:
        original(self, step, *args, **kw)
        saves.append(step)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(TuneState, "save_step", save_then_stop)
    with pytest.raises(KeyboardInterrupt, match="step 6 is kept"):
        finetune(checkpoint, tmp_path / "cut", cfg, progress=False)
    assert not (tmp_path / "cut").exists() and (tmp_path / "cut.partial" / "step.json").is_file()
    monkeypatch.setattr(TuneState, "save_step", original)
    resumed = finetune(checkpoint, tmp_path / "cut", cfg, progress=False)
    assert (resumed / "model.safetensors").read_bytes() == (
        whole / "model.safetensors"
    ).read_bytes()


# -- bad input: one line, nothing at --out -----------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["finetune", *args])
    return result.exit_code, result.output


def test_bad_input_gets_one_line_and_leaves_nothing(
    checkpoint: Path, peaked: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    out = str(tmp_path / "out")
    data = ["--data", str(peaked / "calib.txt"), "--seqlen", "32", "--windows", "4"]
    rtn = cp.save(cp.quantize(str(peaked), "rtn", bits=4, group_size=32, progress=False),
                  tmp_path / "rtn")  # fmt: skip
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    other_vocab = model_dir_like(tiny_dir, tmp_path / "other", vocab_size=VOCAB + 8)
    cases = [
        ([str(rtn), "--train", "lowrank", *data], "--train lowrank: no layer"),
        ([str(checkpoint), "--train", "codes", *data], "unknown part codes"),
        ([str(checkpoint), "--data", str(empty), "--seqlen", "32"], "contains no text"),
        ([str(checkpoint), "--teacher", str(other_vocab), *data], "vocabulary has 136 tokens"),
        ([str(checkpoint), "--epochs", "0", *data], "--epochs 0 is not valid"),
        ([str(checkpoint), "--lr", "scales", *data], "is not PART=RATE"),
        ([str(tmp_path / "nothing"), *data], "no checkpoint directory"),
    ]
    for args, message in cases:
        code, output = _cli(*args, "--out", out, "--no-progress")
        lines = [ln for ln in output.splitlines() if ln.startswith("error")]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, output)
        assert not Path(out).exists() and not Path(out + ".partial").exists(), args


def test_a_checkpoint_without_a_base_model_needs_a_teacher(
    checkpoint: Path, peaked: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in checkpoint.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    config = json.loads((bare / "config.json").read_text())
    config["quantization_config"]["base_model"] = None
    (bare / "config.json").write_text(json.dumps(config))
    from compensator.io.native import write_manifest

    write_manifest(bare)
    cfg = TuneConfig(data=str(peaked / "calib.txt"), **SMALL)
    with pytest.raises(CompensatorError, match=r"records no base model.*--teacher"):
        finetune(bare, tmp_path / "o", cfg, progress=False)
    out = finetune(bare, tmp_path / "o", TuneConfig(**{**cfg.__dict__, "teacher": str(peaked)}),
                   progress=False)  # fmt: skip
    assert json.loads((out / "config.json").read_text())["quantization_config"]["finetune"][
        "teacher"
    ] == str(peaked)


def test_finetuned_checkpoint_exports_to_gguf_with_its_trained_scales(
    peaked: Path, tmp_path: Path
) -> None:
    import gguf
    import numpy as np
    from transformers import AutoConfig

    from test_kquant import _base_gguf

    qm = cp.quantize(str(peaked), "rtn", bits=4, group_size=32, symmetric=True, progress=False)
    base = cp.save(qm, tmp_path / "q4_0")
    cfg = TuneConfig(data=str(peaked / "calib.txt"), train="scales", **SMALL)
    out = finetune(base, tmp_path / "ft", cfg, progress=False)
    header = _base_gguf(tmp_path / "base.gguf", AutoConfig.from_pretrained(peaked))
    path = cp.export(out, tmp_path / "m.gguf", format="gguf", base=str(header))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    down = tensors["blk.1.ffn_down.weight"]  # not permuted: rows as ours
    assert down.tensor_type.name == "Q4_0"
    trained = cp.load(out).model.layers[1].mlp.down_proj.dequantize_weight().numpy()
    before = cp.load(base).model.layers[1].mlp.down_proj.dequantize_weight().numpy()
    theirs = gguf.quants.dequantize(down.data, down.tensor_type).reshape(trained.shape)
    assert np.array_equal(theirs, trained) and not np.array_equal(theirs, before)
