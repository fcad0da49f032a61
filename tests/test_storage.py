"""Where calibration streams rest: memory-mapped files on disk give the same bits as memory,
leave no file behind, and ``auto`` picks from free memory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import compensator as cp
from compensator.errors import CompensatorError
from compensator.models.loading import LoadedModel
from compensator.pipeline.storage import Storage, choose_storage
from conftest import VOCAB, tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_disk_storage_round_trips_and_leaves_no_file(tmp_path: Path, dtype: torch.dtype) -> None:
    storage = Storage(torch.device("cpu"), tmp_path)
    x = (torch.randn(3, 5, 7) * 100).to(dtype)
    stored = storage.put(x[:, 1:])  # a non-contiguous view
    assert torch.equal(stored, x[:, 1:]) and stored.dtype == dtype
    assert list(tmp_path.iterdir()) == []  # unlinked: the mapping keeps the bytes
    assert storage.bytes_on_disk == x[:, 1:].numel() * x.element_size()
    tree = storage.tree({"a": (x, None), "b": [x[0]], "c": 3})
    assert torch.equal(tree["a"][0], x) and tree["a"][1] is None and tree["c"] == 3
    assert storage.put(torch.empty(0, 4)).shape == (0, 4)


def test_auto_picks_the_first_place_with_room(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert choose_storage("auto", cpu, 100, None, free={"cpu": 1000}).kind == "cpu"
    disk = choose_storage("auto", cpu, 900, tmp_path, free={"cpu": 1000})
    assert disk.kind == "disk" and disk.directory is not None
    assert disk.directory.parent == tmp_path
    disk.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CompensatorError, match="--offload-dir"):
        choose_storage("auto", cpu, 900, None, free={"cpu": 1000})
    # On a GPU the device comes first, then CPU memory.
    gpu = torch.device("cuda")
    assert choose_storage("auto", gpu, 100, None, free={"cuda": 1000}).device == gpu
    got = choose_storage("auto", gpu, 900, None, free={"cuda": 1000, "cpu": 10**6})
    assert got.kind == "cpu"


def test_an_unusable_offload_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CompensatorError, match="cannot use --offload-dir"):
        choose_storage("disk", torch.device("cpu"), 1, blocker / "sub")


@pytest.mark.parametrize("recipe", ["gptq", "gptaq-exact"])
def test_streams_on_disk_give_the_same_bits(
    tmp_path: Path, recipe: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    close = Storage.close
    monkeypatch.setattr(
        Storage, "close", lambda self: (written.append(self.bytes_on_disk), close(self))
    )
    model = tiny_llama(layers=2, hidden=64)
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    states = {}
    for where in ("cpu", "disk"):
        loaded = LoadedModel(copy.deepcopy(model), tokenizer=None, source="tiny")
        qm = cp.quantize(
            loaded, recipe, calibration=ids, batch_size=2, progress=False, inplace=True,
            streams=where, offload_dir=tmp_path / "offload",
        )  # fmt: skip
        states[where] = qm.model.state_dict()
    assert states["cpu"].keys() == states["disk"].keys()
    for name, t in states["cpu"].items():
        assert torch.equal(t, states["disk"][name]), name
    assert list((tmp_path / "offload").iterdir()) == []  # its streams-* directory is gone
    # Every block's streams went through the files: at least the 2 x 4 x 32 x 64 fp32
    # entering and leaving each of the 2 blocks.
    assert written[0] == 0 and written[1] >= 2 * 2 * 4 * 32 * 64 * 4, written
