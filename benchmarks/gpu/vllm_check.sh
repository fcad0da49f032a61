#!/usr/bin/env bash
# Ready GPU check (run where a GPU and vLLM are available; not part of CI):
# serve a compressed-tensors export with vLLM and compare its greedy generations and
# next-token log-probs with transformers' on the same export.
#   bash benchmarks/gpu/vllm_check.sh out/smol-w4-ct [PROMPTS_FILE]
set -euo pipefail
EXPORT=${1:?usage: vllm_check.sh EXPORT_DIR [PROMPTS_FILE]}
PROMPTS=${2:-}
python - "$EXPORT" "$PROMPTS" <<'PY'
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm import LLM, SamplingParams

path, prompts_file = sys.argv[1], sys.argv[2]
prompts = (open(prompts_file).read().splitlines() if prompts_file else
           ["The capital of France is", "Quantization of neural networks", "def fibonacci(n):"])
tok = AutoTokenizer.from_pretrained(path)
llm = LLM(model=path, dtype="float16", enforce_eager=True, gpu_memory_utilization=0.5)
params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5)
t0 = time.perf_counter()
outs = llm.generate(prompts, params)
vllm_s = time.perf_counter() - t0
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).cuda().eval()
rows = []
for prompt, out in zip(prompts, outs):
    ids = tok(prompt, return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        gen = ref.generate(ids, max_new_tokens=32, do_sample=False)
        first = torch.log_softmax(ref(ids).logits[0, -1].float(), -1)
    theirs = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    top = out.outputs[0].logprobs[0]
    diffs = [abs(lp.logprob - float(first[t])) for t, lp in top.items()]
    rows.append({"prompt": prompt, "same_text": out.outputs[0].text == theirs,
                 "first_token_logprob_max_diff": max(diffs)})
print(json.dumps({"vllm_seconds": vllm_s, "rows": rows}, indent=1))
PY
