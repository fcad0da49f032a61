import pytest
import torch

from compensator.quant import QuantSpec, fake_quantize, fit_params, pack_int32, unpack_int32
from compensator.quant.grid import quantize_with_params


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 100, 576])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, 2, n), generator=g)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, 2, (n * bits + 31) // 32)
    assert torch.equal(unpack_int32(packed, bits, n), codes)


def test_pack_is_dense_bitstream() -> None:
    # 4-bit codes 1..8 in one word, little-endian nibbles: 0x87654321.
    codes = torch.arange(1, 9)[None]
    assert pack_int32(codes, 4).item() == 0x87654321 - 2**32


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        pack_int32(torch.tensor([[16]]), 4)


def test_ragged_last_group_and_zero_in_range() -> None:
    spec = QuantSpec(bits=4, group_size=128)
    w = torch.rand(4, 576) + 0.5  # strictly positive: the range must still include 0
    params = fit_params(w, spec)
    assert params.scale.shape == (4, 5)
    assert torch.equal(params.zero, torch.zeros_like(params.zero))
    assert spec.group_of_columns(576)[-1].item() == 4
    # The short last group is fitted on its own 64 columns only.
    last = w[:, 512:]
    expected = (last.max(dim=1).values / 15).half().float()
    assert torch.allclose(params.scale[:, 4], expected)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_error_bounded_by_half_step(bits: int, sym: bool) -> None:
    spec = QuantSpec(bits=bits, group_size=32, symmetric=sym, scale_dtype="float32")
    w = torch.randn(8, 96)
    wq = fake_quantize(w, spec)
    params = fit_params(w, spec)
    step = params.scale[:, spec.group_of_columns(96)]
    codes = quantize_with_params(w, params, spec)
    assert codes.min() >= 0 and codes.max() <= spec.maxq
    assert len(torch.unique(wq[0, :32])) <= 2**bits
    err = (w - wq).abs()
    if not sym:
        assert (err <= step / 2 + 1e-6).all()
        return
    # Symmetric: the larger end sits on the lowest level exactly; the other end may lie up
    # to one step beyond the highest level, so only the top code can be more than half a
    # step off, by at most a whole step.
    top = codes == spec.maxq
    assert (err[~top] <= step.abs()[~top] / 2 + 1e-6).all()
    assert (err <= step.abs() + 1e-6).all()
    group = w[:, :32]
    extreme = group.gather(1, group.abs().argmax(1, keepdim=True))
    assert torch.allclose(wq[:, :32].gather(1, group.abs().argmax(1, keepdim=True)), extreme)


def test_symmetric_grid_beats_the_mirrored_rule() -> None:
    """The signed rule against the GPTQ reference code's 2 max|w| / maxq, brute force."""
    w = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits=bits, group_size=32, symmetric=True, scale_dtype="float32")
        half = 2 ** (bits - 1)
        s = 2 * w.abs().amax(1, keepdim=True) / spec.maxq
        mirrored = (torch.clamp(torch.round(w / s) + half, 0, spec.maxq) - half) * s
        ours = (fake_quantize(w, spec) - w).pow(2).mean()
        assert ours < 0.95 * (mirrored - w).pow(2).mean(), bits


def test_clip_search_never_worse_in_its_norm() -> None:
    spec = QuantSpec(bits=3, group_size=64)
    w = torch.randn(16, 128) * torch.linspace(0.1, 3, 128)
    plain = fake_quantize(w, spec)
    clipped = fake_quantize(w, spec, clip_search=True)
    err = lambda q: (w - q).abs().pow(2.4).sum()  # noqa: E731
    assert err(clipped) <= err(plain) + 1e-6


def test_per_channel_and_spec_validation() -> None:
    assert QuantSpec(group_size=-1).group_size is None
    assert QuantSpec(group_size=None).n_groups(576) == 1
    with pytest.raises(ValueError):
        QuantSpec(bits=9)
    with pytest.raises(ValueError):
        QuantSpec(bits=1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 577])
def test_aligned_widths_pack_as_the_bit_stream_does(bits: int, n: int) -> None:
    """Widths dividing 32 take a shortcut: the same words as the general bit stream."""
    from compensator.quant.pack import _pack_stream, _unpack_stream

    g = torch.Generator().manual_seed(bits * 7 + n)
    codes = torch.randint(0, 2**bits, (5, n), generator=g)
    codes[0] = 2**bits - 1  # top bit of every word set: negative int32 words
    words = pack_int32(codes, bits)
    assert torch.equal(words, _pack_stream(codes, bits))
    assert torch.equal(unpack_int32(words, bits, n), _unpack_stream(words, bits, n))
    assert unpack_int32(words, bits, n).dtype == torch.int64
