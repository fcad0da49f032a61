"""Downstream tasks through lm-eval: ``compensator eval --tasks`` on a local multiple-choice
task the test writes, checked against a brute-force scorer and against lm-eval called directly."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compensator.tasks import metrics_of, parse_tasks
from conftest import VOCAB, require


@pytest.fixture(autouse=True)
def _lm_eval_installed() -> None:
    require(importlib.util.find_spec("lm_eval") is not None, "lm-eval not installed (its extra)")


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randint(3, VOCAB - 1)}" for _ in range(n))


def _continuation_logprob(model: torch.nn.Module, tok, context: str, choice: str) -> float:
    """log P(choice | context) summed over the choice's tokens: what acc ranks by."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def write_task(directory: Path, model: torch.nn.Module, tok, docs: int = 40) -> Path:
    """A 4-way task whose answer is the choice the FP ``model`` finds likeliest: FP scores 1.0
    by construction, and any model that ranks differently scores lower."""
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(docs):
        question = _words(rng, 6)
        choices = [_words(rng, 3) for _ in range(4)]
        scores = [_continuation_logprob(model, tok, question, c) for c in choices]
        rows.append({"question": question, "choices": choices, "answer": scores.index(max(scores))})
    data = directory / "fp_choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "fp_choice.yaml").write_text(
        "task: fp_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return directory


@pytest.fixture(scope="module")
def task_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return write_task(tmp_path_factory.mktemp("tasks"), model, tok)


@pytest.fixture(scope="module")
def w2_checkpoint(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import compensator as cp

    out = tmp_path_factory.mktemp("w2") / "ckpt"
    qm = cp.quantize(str(tiny_dir), "rtn", bits=2, group_size=16, progress=False, device="cpu")
    cp.save(qm, out)
    return out


def _eval_json(target: Path, text: Path, *args: str) -> dict:
    from compensator.cli import main

    flags = ["--json", "--no-progress", "--windows", "4", "--seqlen", "64", "--data", str(text)]
    r = CliRunner().invoke(main, ["eval", str(target), *args, *flags])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_metrics_of_names_metrics_without_filters() -> None:
    raw = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact,strict": 1}}
    assert metrics_of(raw) == {"t": {"acc": 0.5, "acc_stderr": 0.1, "exact[strict]": 1.0}}
    assert metrics_of({"t": {"acc,none": float("nan")}}) == {"t": {"acc": None}}
    assert parse_tasks(" a, ,b ") == ["a", "b"] and parse_tasks(None) == []


def test_fp_scores_its_own_task_and_w2_rtn_less(
    tiny_dir: Path, task_dir: Path, w2_checkpoint: Path
) -> None:
    task = ["--tasks", "fp_choice", "--include-path", str(task_dir)]
    fp = _eval_json(tiny_dir, tiny_dir / "eval.txt", *task)
    w2 = _eval_json(w2_checkpoint, tiny_dir / "eval.txt", *task)
    assert fp["tasks"]["fp_choice"]["acc"] == 1.0  # our brute-force ranking is lm-eval's
    assert w2["tasks"]["fp_choice"]["acc"] < fp["tasks"]["fp_choice"]["acc"]
    assert set(w2["tasks"]["fp_choice"]) >= {"acc", "acc_norm", "acc_stderr"}
    assert w2["kl"] > 0 and w2["fp_ppl"] == pytest.approx(fp["ppl"])  # one table: ppl, KL, tasks


def test_same_numbers_as_lm_eval_called_directly(
    tiny_dir: Path, task_dir: Path, w2_checkpoint: Path
) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    import compensator as cp

    ours = _eval_json(
        w2_checkpoint,
        tiny_dir / "eval.txt",
        "--tasks",
        "fp_choice",
        "--include-path",
        str(task_dir),
    )
    model = cp.load(w2_checkpoint)
    tok = AutoTokenizer.from_pretrained(w2_checkpoint)
    direct = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=1),
        tasks=["fp_choice"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )["results"]["fp_choice"]
    assert ours["tasks"]["fp_choice"]["acc"] == direct["acc,none"]
    assert ours["tasks"]["fp_choice"]["acc_norm"] == direct["acc_norm,none"]


def test_limit_scores_only_the_first_documents(tiny_dir: Path, task_dir: Path) -> None:
    task = ["--tasks", "fp_choice", "--include-path", str(task_dir), "--limit", "5"]
    out = _eval_json(tiny_dir, tiny_dir / "eval.txt", *task)
    assert out["tasks"]["fp_choice"]["acc"] == 1.0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--tasks", "no_such_task"], "unknown lm-eval task(s) no_such_task"),
        (["--tasks", "fp_choice", "--include-path", "/nonexistent"], "is not a directory"),
        (["--tasks", "no_such_task", "--limit", "0"], "--limit 0 is not valid"),
    ],
)
def test_bad_task_arguments_are_one_line_before_loading(
    tiny_dir: Path, no_model_load: list[str], args: list[str], says: str
) -> None:
    from compensator.cli import main

    r = CliRunner().invoke(main, ["eval", str(tiny_dir), *args])
    assert r.exit_code == 2, r.output
    assert says in r.output and len(r.output.strip().splitlines()) == 1
    assert no_model_load == []
