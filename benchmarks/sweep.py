"""Sweep GPTQ rounder options on SmolLM2-135M (quick protocol), one line of JSON per variant.

    COMPENSATOR_DATA=../shared/data PYTHONPATH=src python benchmarks/sweep.py \
        '[[3, 128, {"asymmetric": true, "asymmetric_form": "exact", "alpha": 0.5}]]'

Each variant: [bits, group_size, options of the gptq step]. Prints ppl, KL, seconds.
"""

import copy
import json
import logging
import sys
import time

import torch

import compensator as cp
from compensator.data import load_calibration_windows, load_eval_windows
from compensator.evaluate import evaluate
from compensator.models.loading import LoadedModel, load_model
from compensator.quant import QuantSpec
from compensator.recipes import Recipe, Scheme
from compensator.steps.gptq import GPTQStep

torch.set_num_threads(2)
logging.basicConfig(level=logging.WARNING)
lm = load_model("smollm2-135m")
ev = load_eval_windows(lm.tokenizer, "wikitext2", 512, 16)
cal = load_calibration_windows(lm.tokenizer, "wikitext2-valid", 32, 512, 0)
variants = json.loads(sys.argv[1])
for bits, gs, opts in variants:
    rec = Recipe(
        name="x",
        scheme=Scheme(weights=QuantSpec(bits=bits, group_size=gs)),
        steps=[GPTQStep(**opts)],
    )
    t = time.time()
    qm = cp.quantize(
        LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.source),
        rec,
        calibration=cal,
        inplace=True,
        progress=False,
    )
    dt = time.time() - t
    r = evaluate(qm.model, ev, fp_model=lm.model, progress=False)
    print(
        json.dumps(
            {
                "bits": bits,
                "gs": gs,
                **opts,
                "ppl": round(r.ppl, 3),
                "kl": round(r.kl, 4),
                "sec": round(dt, 1),
                "solve": round(qm.report["seconds"]["solve"], 1),
            }
        ),
        flush=True,
    )
