"""Run under torchrun by tests/test_distributed.py: quantize a model with several recipes,
data-parallel over the launched ranks, through the Python API (rank 0 saves each)."""

from __future__ import annotations

import json
import sys

import torch

from compensator import api
from compensator.parallel import process_group


def main() -> None:
    model, calib, out, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    with process_group(torch.device("cpu")) as ranks:
        assert ranks.parallel, "run me under torchrun --nproc-per-node 2 or more"
        for name, recipe, kw in cases:
            if model == "qwen3_moe":  # a tiny MoE: experts routed different tokens per rank
                from test_moe import _ids, _tokenizer, qwen3_moe

                qm = api.quantize(
                    qwen3_moe(), recipe, tokenizer=_tokenizer(), calibration=_ids(),
                    device="cpu", progress=False, **kw,
                )  # fmt: skip
            else:
                qm = api.quantize(
                    model, recipe, calibration=calib, device="cpu", progress=False, **kw
                )
            api.save(qm, f"{out}/{name}")


if __name__ == "__main__":
    main()
