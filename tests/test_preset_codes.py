"""Every preset's output on a tiny random Llama, pinned by hashes: a refactor of the engine,
the steps or the layers must leave codes, scales, factors and the rest of the model bit for
bit as they were (``tests/data/preset_codes.json``).

The weights are drawn from our own seeded generator, not transformers' initializers, so a
transformers release that changes its init does not move the hashes. To re-pin after an
intended change of results: ``python tests/test_preset_codes.py --write``, and say why in the
commit.

The linear-algebra libraries take other code paths on other CPUs (an AMD EPYC with AVX-512
gives other last bits than the machine the first pins came from in SVDs, least squares and
training, same code), so the pins are kept per CPU kind (vendor and torch's CPU capability),
with the first machine's as the default for kinds not pinned yet.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import compensator as cp
from compensator.models.loading import LoadedModel
from compensator.recipes.recipe import preset_names
from conftest import VOCAB, tiny_llama

PINNED = Path(__file__).parent / "data" / "preset_codes.json"
CODE_BUFFERS = {"qweight", "qzeros", "indices", "sign_bits"}


def cpu_kind() -> str:
    vendor = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next(
                (ln.split(":")[1].strip() for ln in f if ln.startswith("vendor_id")), vendor
            )
    except OSError:
        pass
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


def _pins() -> dict[str, dict[str, str]]:
    kinds = json.loads(PINNED.read_text())
    return kinds.get(cpu_kind(), kinds["default"])


def _jobs() -> list[tuple[str, str, dict[str, int]]]:
    jobs = [(name, name, {}) for name in preset_names()]
    # Group size 32 on 64/96-wide inputs: several groups per row, so act-order's group fitting
    # is exercised too (the presets' g128 covers a whole row here). VQ has no groups.
    jobs += [(f"{n}@g32", n, {"group_size": 32}) for n in preset_names() if "vq" not in n]
    return jobs


def _model() -> torch.nn.Module:
    model = tiny_llama(layers=2, hidden=64)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)
    return model


def _digest(items: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _hashes(preset: str, overrides: dict[str, int]) -> dict[str, str]:
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    loaded = LoadedModel(_model(), None, "tiny")
    qm = cp.quantize(
        loaded, preset, calibration=ids, inplace=True, progress=False, device="cpu",
        batch_size=2, **overrides,
    )  # fmt: skip
    state = sorted(qm.model.state_dict().items())
    layers = tuple(f"{m}." for m in qm.quantization_config["modules"])
    inside = [(k, v) for k, v in state if k.startswith(layers)]
    return {
        "codes": _digest([(k, v) for k, v in inside if k.rsplit(".", 1)[1] in CODE_BUFFERS]),
        "floats": _digest([(k, v) for k, v in inside if k.rsplit(".", 1)[1] not in CODE_BUFFERS]),
        "rest": _digest([(k, v) for k, v in state if not k.startswith(layers)]),
    }


@pytest.mark.parametrize(("job", "preset", "overrides"), _jobs(), ids=[j[0] for j in _jobs()])
def test_preset_output_is_pinned(job: str, preset: str, overrides: dict[str, int]) -> None:
    pins = _pins()
    assert job in pins, f"no pinned hashes for {job}: write them with --write"
    assert _hashes(preset, overrides) == pins[job]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    PINNED.parent.mkdir(exist_ok=True)
    kinds = json.loads(PINNED.read_text()) if PINNED.exists() else {}
    kinds[cpu_kind()] = {job: _hashes(preset, kw) for job, preset, kw in _jobs()}
    kinds.setdefault("default", kinds[cpu_kind()])
    PINNED.write_text(json.dumps(kinds, indent=1, sort_keys=True) + "\n")
