"""Data-parallel runs under torchrun (gloo, 2 CPU processes) against one process on the same
windows: the same codes for >= 99% of the weights, logits within 1e-3 relative (recipes that
amplify the order of sums: the first group's codes, logits within 15%); the CLI under
torchrun; a rank that dies stops the run and leaves no checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compensator import api
from compensator.nn.quant_linear import QuantLinear
from compensator.nn.vq_linear import VQLinear
from compensator.parallel import SOLO, Ranks, owners
from conftest import model_dir_like

HERE = Path(__file__).parent
CALIB = {"calib_windows": 16, "seqlen": 64, "batch_size": 4}
# float32 scales: with the default float16 ones a last-bit difference in a Hessian (the
# order of a sum) may move a scale across a float16 rounding boundary, and GPTQ's error
# feedback carries that through the row and the later blocks; one process with batches of 1
# instead of 4 then agrees on only 97.6% of the codes (measured on this model). gptaq-exact
# with its FP stream in float32: in the preset's bfloat16 one process with batches of 2
# instead of 4 agrees on 76% of the codes.
SCHEME = "scheme: {weights: {bits: 4, group_size: 16, symmetric: false, scale_dtype: float32}}"
RECIPES = {
    "gptq": "- gptq: {damp: 0.01, act_order: true}",
    "gptaq-exact": "- gptq: {damp: 0.01, act_order: true, asymmetric: true, "
    "asymmetric_form: exact, alpha: 0.5, fp_precision: float32}",
    "gptq-l2qer": "- gptq: {damp: 0.01, act_order: true}\n  - lqer: {rank: 4, scale: l2}",
    # Its later layers calibrate on corrected outputs, and a rank-4 SVD whose cutoff falls
    # between near-equal singular values turns a few flipped codes into another low-rank
    # term: on an Intel Xeon (AVX-512) 2 ranks and one process agree on the first group's
    # codes and low-rank terms (6.7e-5 relative, float16 factors), then on 99.95% of o_proj's
    # codes but o_proj's term moves by 4%, and the run ends at 95.8% of all codes equal,
    # logits 2.9% apart (an AMD EPYC gave >= 99%). So it is checked like the rotation below.
    # OmniQuant with 2 windows per optimizer step (the preset's 1 cannot be split over ranks)
    # a model transform, 4-bit activations, LRC solving its own rounding with split-input
    # bases that rank 0 sends. Its alternating solve amplifies last-bit differences of the
    # statistics: one process with 1 instead of 2 threads agrees on 58% of the codes (logits
    # 4.9% apart) on this model, 2 ranks on 44% (5.6%); so it is checked more loosely. Its
    # first group: >= 95% of the codes equal on an AMD EPYC, 92.9% on an Intel Xeon (logits
    # 6.1% apart).
    "quarot-gptq-lrc-split": "- rotate: {rotation: hadamard, heads: true, online_down: true}\n"
    "  - gptq: {damp: 0.01, act_order: true}\n  - lrc: {rank: 16, split: true}",
    # SSVQ: trained codebooks and latent signs (DDP-averaged), then VQ rounding per Linear
    "ssvq": "- ssvq: {lr: 0.001, sign_lr: 0.005}\n  - train: {epochs: 1, batch_size: 2}\n"
    "  - vq: {dim: 8, bits: 6, signs: true}",
    # OmniQuant's GPTQ on the trained block: a last-bit difference of o_proj's Hessian (the
    # order of its sums) flips 0.3% of block 0's o_proj codes and the trained later blocks
    # amplify it (92.2% of all codes equal, logits 5.3% apart, the first group 100%). Which
    # seed and code path meet such a near-tie is chance: with GPTQ's former inverse-factor
    # arithmetic one process gave the very codes 2 ranks give now, and 2 ranks agreed with it.
    "omniquant": "- let: {lr: 0.01}\n  - lwc: {lr: 0.05, init: 4.0}\n"
    "  - train: {epochs: 1, batch_size: 2}\n  - gptq: {damp: 0.01, act_order: true}",
}


# Recipes checked on the first group's codes (this share equal) and logits within 15%: what
# follows the first group amplifies the order of the statistics' sums (see RECIPES).
FIRST_GROUP_ONLY = {"gptq-l2qer": 0.99, "quarot-gptq-lrc-split": 0.90, "omniquant": 0.99}


def _torchrun(*args: object, ranks: int = 2, timeout: float = 600) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={ranks}", *map(str, args)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _model_dir(tmp_path: Path, tiny_dir: Path) -> Path:
    return model_dir_like(tiny_dir, tmp_path / "model", layers=3, seed=7)


def _codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each quantized layer's integer codes (a VQ layer's: its codeword indices and signs)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[n] = m.quantized_weight().codes
        elif isinstance(m, VQLinear):
            vq = m.vq_weight()
            signs = [] if vq.signs is None else [vq.signs.flatten().long()]
            out[n] = torch.cat([vq.indices.flatten().long(), *signs])
    return out


@pytest.mark.slow
def test_two_ranks_give_one_process_results(tiny_dir: Path, tmp_path: Path) -> None:
    model = _model_dir(tmp_path, tiny_dir)
    calib = str(model / "calib.txt")
    cases = []
    for name, steps in RECIPES.items():
        scheme = SCHEME
        if name.startswith("quarot"):
            scheme = scheme[:-1] + ", activations: {bits: 4, granularity: token, symmetric: true}}"
        (tmp_path / f"{name}.yaml").write_text(f"{scheme}\nsteps:\n  {steps}\n")
        cases.append((name, str(tmp_path / f"{name}.yaml"), CALIB))
    run = _torchrun(HERE / "dist_worker.py", model, calib, tmp_path / "dp", json.dumps(cases))
    out, _ = run.communicate(timeout=900)
    assert run.returncode == 0, out
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    for name, recipe, kw in cases:
        one = api.quantize(
            str(model), recipe, calibration=calib, device="cpu", progress=False, **kw
        )
        api.save(one, tmp_path / "one" / name)
        a, b = api.load(tmp_path / "one" / name), api.load(tmp_path / "dp" / name)
        wa, wb = _codes(a), _codes(b)
        assert wa.keys() == wb.keys() and len(wa) == 21, name
        same = sum(int((wa[k] == wb[k]).sum()) for k in wa) / sum(w.numel() for w in wa.values())
        first_group = FIRST_GROUP_ONLY.get(name)
        if first_group is not None:  # there, the statistics differ only by their sums' order
            first = [
                k for k in wa if k.startswith("model.layers.0.self_attn.") and "o_proj" not in k
            ]
            same = sum(int((wa[k] == wb[k]).sum()) for k in first) / sum(
                wa[k].numel() for k in first
            )
            assert same >= first_group, f"{name}: {same:.4f} of the first group's codes equal"
        else:
            assert same >= 0.99, f"{name}: {same:.4f} of the codes equal"
        print(f"{name}: {same:.4%} of the codes equal", end=", ")
        with torch.no_grad():
            la, lb = a(ids).logits, b(ids).logits
        rel = float((la - lb).norm() / la.norm())
        loose = first_group is not None
        assert rel < (0.15 if loose else 1e-3), f"{name}: logits differ by {rel:.2e} relative"
        print(f"logits {rel:.1e} relative")
        if name in ("gptq-l2qer", "quarot-gptq-lrc-split"):  # low-rank terms from their owners
            low = [m for m in b.modules() if isinstance(m, QuantLinear) and m.lowrank() is not None]
            assert len(low) == 21


@pytest.mark.slow
def test_cli_under_torchrun_writes_and_speaks_once(tiny_dir: Path, tmp_path: Path) -> None:
    model = _model_dir(tmp_path, tiny_dir)
    out = tmp_path / "q"
    args = ["-m", "compensator", "quantize", model, "--recipe", "gptq", "--out", out]
    args += ["--calib", model / "calib.txt", "--calib-windows", 8, "--seqlen", 32]
    args += ["--batch-size", 4, "--device", "cpu", "--no-progress"]
    run = _torchrun(*args)
    text, _ = run.communicate(timeout=600)
    assert run.returncode == 0, text
    # rank 0 speaks and writes; rank 1 does neither
    assert sum(line.startswith("saved ") for line in text.splitlines()) == 1, text
    assert (out / "model.safetensors").is_file() and not Path(f"{out}.partial").exists()
    bad = _torchrun(*args[:-7], "--calib-windows", 7, "--seqlen", 32, "--batch-size", 4,
                    "--device", "cpu", "--force")  # fmt: skip
    text, _ = bad.communicate(timeout=600)
    assert bad.returncode != 0
    errors = [line for line in text.splitlines() if line.startswith("error (rank ")]
    assert len(errors) == 2 and all("--calib-windows a multiple of 2" in e for e in errors), text


@pytest.mark.slow
def test_moe_experts_reduce_over_ranks(tmp_path: Path) -> None:
    """Each rank routes its own tokens: an expert's statistics are summed over the ranks
    that reached it (every rank must still send one, zeros where it saw no token)."""
    from test_moe import _ids, _tokenizer, qwen3_moe

    kw = {"group_size": 16, "batch_size": 4}
    cases = [("gptq", "gptq", kw), ("gptq-l2qer", "gptq-l2qer", {**kw, "rank": 4})]
    run = _torchrun(HERE / "dist_worker.py", "qwen3_moe", "-", tmp_path, json.dumps(cases))
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out
    for name, recipe, k in cases:
        one = api.quantize(
            qwen3_moe(), recipe, tokenizer=_tokenizer(), calibration=_ids(), device="cpu",
            progress=False, **k,
        )  # fmt: skip
        a, b = _codes(one.model), _codes(api.load(tmp_path / name))
        assert a.keys() == b.keys() and any(".experts." in n for n in a), name
        same = sum(int((a[n] == b[n]).sum()) for n in a) / sum(t.numel() for t in a.values())
        assert same >= 0.99, f"{name}: {same:.4f} of the codes equal"


def _rank_pid(parent: int, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[1]) == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_a_dead_rank_stops_the_run_which_then_resumes(tiny_dir: Path, tmp_path: Path) -> None:
    model = model_dir_like(tiny_dir, tmp_path / "model", layers=12, hidden=128, seed=3)
    out = tmp_path / "q"
    args = [
        "-m", "compensator", "quantize", model, "--recipe", "gptaq-exact", "--out", out,
        "--calib", model / "calib.txt", "--calib-windows", 16, "--seqlen", 64,
        "--batch-size", 2, "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    run = _torchrun(*args)
    partial = Path(f"{out}.partial")
    deadline = time.monotonic() + 300
    while not list(partial.glob("block-00000.json")) and time.monotonic() < deadline:
        assert run.poll() is None, run.communicate()[0]
        time.sleep(0.2)
    victim = _rank_pid(run.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    text, _ = run.communicate(timeout=120)
    assert run.returncode != 0, text
    # rank 0 is stopped by torchrun, or (when it noticed first, waiting in a collective) says
    # so in one line: never gloo's traceback
    assert "[rank0]: Traceback" not in text, text
    assert time.monotonic() - t0 < 60, "the other rank went on after rank 1 died"
    assert not out.exists(), text  # no checkpoint, not even a partial-looking one
    kept = len(list(partial.glob("block-*.json")))
    assert kept >= 1, "the finished blocks are kept for a resume"
    again = _torchrun(*args)
    text, _ = again.communicate(timeout=600)
    assert again.returncode == 0, text
    assert f"blocks 0-{kept - 1} of 12 restored" in text, text
    whole = _torchrun(*args[:7], tmp_path / "whole", *args[8:])
    text, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, text
    for name in ("model.safetensors", "config.json"):  # bit-identical to an uninterrupted run
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_peer_gone_is_one_line_naming_the_rank(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from compensator.cli_options import friendly

    @friendly
    def waiting() -> None:  # what gloo raises in a rank whose peer died (torch 2.13)
        raise RuntimeError(
            "[../gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer"
        )

    @friendly
    def broken() -> None:
        raise RuntimeError("a bug of ours")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as stop:
        waiting()
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1, err
    assert err[0].startswith("error (rank 0 of 2): another rank of the run stopped"), err
    with pytest.raises(RuntimeError, match="a bug of ours"):  # our own bugs keep their traceback
        broken()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RuntimeError, match="Connection reset"):  # one process: not a peer's
        waiting()


def test_owners_balance_the_work() -> None:
    costs = [9.0, 7.0, 6.0, 5.0, 4.0, 3.0]
    got = owners(costs, 2)
    load = [sum(c for c, r in zip(costs, got, strict=True) if r == k) for k in range(2)]
    assert sorted(load) == [17.0, 17.0]  # the optimum here; longest-first finds it
    assert owners(costs, 1) == [0] * 6
    assert owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]


def test_shard_splits_every_batch_in_equal_slices() -> None:
    ids = torch.arange(12).reshape(12, 1)
    parts = [Ranks(r, 2).shard(ids, 4) for r in range(2)]
    assert [p[1] for p in parts] == [2, 2]
    assert parts[0][0].flatten().tolist() == [0, 1, 4, 5, 8, 9]
    assert parts[1][0].flatten().tolist() == [2, 3, 6, 7, 10, 11]
    assert SOLO.shard(ids, 4)[0] is ids
    with pytest.raises(Exception, match=r"--batch-size 3\) do not split evenly over 2 ranks"):
        Ranks(0, 2).shard(ids, 3)
    with pytest.raises(Exception, match=r"the recipe's train: batch_size 1"):
        Ranks(0, 2).shard(ids, 1, "the recipe's train: batch_size")
