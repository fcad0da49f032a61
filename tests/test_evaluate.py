"""Perplexity and KL against brute-force references computed window by window."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from compensator.errors import CompensatorError
from compensator.evaluate import EvalResult, evaluate, perplexity, window_losses

VOCAB = 96
SEQLEN = 12
N_WINDOWS = 5


def make_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, scale: float = 0.05, seed: int = 1) -> LlamaForCausalLM:
    """A copy with noisy weights, standing in for a quantized model."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return make_model()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (N_WINDOWS, SEQLEN), generator=gen)


def brute_force_losses(model: LlamaForCausalLM, windows: torch.Tensor) -> list[float]:
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]
            out.append(F.cross_entropy(logits[:-1].double(), w[1:]).item())
    return out


def brute_force_kl(fp: LlamaForCausalLM, q: LlamaForCausalLM, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            p_log = torch.log_softmax(fp(input_ids=w[None]).logits[0, :-1].double(), dim=-1)
            q_log = torch.log_softmax(q(input_ids=w[None]).logits[0, :-1].double(), dim=-1)
            for pos in range(SEQLEN - 1):
                p = p_log[pos].exp()
                total += float((p * (p_log[pos] - q_log[pos])).sum())
                count += 1
    return total / count


def test_window_losses_match_cross_entropy_per_window(
    model: LlamaForCausalLM, windows: torch.Tensor
) -> None:
    losses = window_losses(model, windows, progress=False)
    assert losses.dtype == torch.float64
    assert losses.shape == (N_WINDOWS,)
    expected = torch.tensor(brute_force_losses(model, windows), dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


def test_windows_are_independent(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    # No context leaks across windows or batch rows: each loss is that of the window alone.
    all_at_once = window_losses(model, windows, batch_size=N_WINDOWS, progress=False)
    single = window_losses(model, windows[2:3], progress=False)
    torch.testing.assert_close(all_at_once[2:3], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 8])
def test_ppl_matches_brute_force(
    model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int
) -> None:
    result = evaluate(model, windows, batch_size=batch_size, progress=False)
    expected = math.exp(sum(brute_force_losses(model, windows)) / N_WINDOWS)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.fp_ppl is None
    assert result.kl is None
    assert (result.windows, result.seqlen) == (N_WINDOWS, SEQLEN)
    assert result.seconds >= 0.0


def test_kl_of_model_against_itself_is_zero(model: LlamaForCausalLM, windows: torch.Tensor) -> None:
    result = evaluate(model, windows, fp_model=model, batch_size=2, progress=False)
    assert result.kl is not None
    assert abs(result.kl) <= 1e-7
    assert result.fp_ppl == pytest.approx(result.ppl, rel=1e-12)


def test_kl_and_fp_ppl_against_perturbed_copy(
    model: LlamaForCausalLM, windows: torch.Tensor
) -> None:
    quantized = perturbed(model)
    result = evaluate(quantized, windows, fp_model=model, batch_size=2, progress=False)
    expected_kl = brute_force_kl(model, quantized, windows)
    assert expected_kl > 1e-4  # the perturbation must matter for the check to mean anything
    assert result.kl == pytest.approx(expected_kl, rel=1e-4)
    # Direction matters: KL(fp || q), not KL(q || fp).
    assert result.kl != pytest.approx(brute_force_kl(quantized, model, windows), rel=1e-4)
    assert result.ppl == pytest.approx(
        math.exp(sum(brute_force_losses(quantized, windows)) / N_WINDOWS), rel=1e-5
    )
    assert result.fp_ppl == pytest.approx(
        math.exp(sum(brute_force_losses(model, windows)) / N_WINDOWS), rel=1e-5
    )


def test_evaluate_restores_training_flag(windows: torch.Tensor) -> None:
    model = make_model(seed=3).train()
    evaluate(model, windows[:1], fp_model=model, progress=False)
    assert model.training


def test_to_dict_round_trips() -> None:
    result = EvalResult(ppl=10.0, fp_ppl=9.5, kl=0.01, windows=4, seqlen=512, seconds=1.5)
    assert result.to_dict() == {
        "ppl": 10.0,
        "fp_ppl": 9.5,
        "kl": 0.01,
        "windows": 4,
        "seqlen": 512,
        "seconds": 1.5,
        "bits_per_weight": None,
        "tasks": None,
    }
    assert EvalResult(**result.to_dict()) == result


def test_perplexity_is_exp_of_mean_window_loss() -> None:
    assert perplexity(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(math.exp(2.0))
    assert perplexity([0.0]) == 1.0
    with pytest.raises(CompensatorError) as exc:
        perplexity(torch.tensor([]))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("bad", "batch_size"),
    [
        (torch.zeros(SEQLEN, dtype=torch.long), 1),
        (torch.zeros((2, 1), dtype=torch.long), 1),
        (torch.zeros((0, SEQLEN), dtype=torch.long), 1),
        (torch.zeros((2, SEQLEN)), 1),
        (torch.zeros((2, SEQLEN), dtype=torch.long), 0),
    ],
)
def test_bad_windows_give_one_line_error(
    model: LlamaForCausalLM, bad: torch.Tensor, batch_size: int
) -> None:
    with pytest.raises(CompensatorError) as exc:
        evaluate(model, bad, batch_size=batch_size, progress=False)
    assert "\n" not in str(exc.value)
