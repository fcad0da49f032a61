"""Peak memory against depth (issue 17): a random Llama of width 1024 (intermediate 4096)
saved as safetensors with 4 and with 16 blocks (``--depths``), quantized in a fresh process each time,
read block by block (``lazy``, the default of ``compensator quantize`` on a local
directory) or loaded whole (``whole``, as before). Peak RSS is the process's ru_maxrss.

    python benchmarks/big_models.py --recipes gptq,gptaq-exact --modes lazy,whole
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WIDTH, INTERMEDIATE, VOCAB = 1024, 4096, 512

_RUN = """
import json, resource, sys, time
import compensator as cp
from compensator.pipeline.memory import fix_mmap_threshold
fix_mmap_threshold()  # as the CLI does
model, recipe, out, mode = sys.argv[1:5]
t0 = time.perf_counter()
qm = cp.quantize(model, recipe, calibration="embedded", calib_windows=4, seqlen=128,
                 batch_size=4, progress=False, resume=out + ".partial", lazy=mode == "lazy")
cp.save(qm, out)
print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}))
"""

_BUILD = """
import sys, torch, transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
layers, out = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=%d, hidden_size=%d, intermediate_size=%d, num_hidden_layers=layers,
    num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
# One token per character below U+0100 (ids below the vocabulary).
backend = Tokenizer(models.WordLevel({chr(i): i for i in range(256)}, unk_token=chr(0)))
backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=chr(0))
tok.save_pretrained(out)
""" % (VOCAB, WIDTH, INTERMEDIATE)  # noqa: UP031  (a script template)


def build(layers: int, where: Path) -> Path:
    out = where / f"llama-{layers}"
    subprocess.run([sys.executable, "-c", _BUILD, str(layers), str(out)], check=True)
    return out


def measure(model: Path, recipe: str, mode: str, out: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _RUN, str(model), recipe, str(out), mode],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(result: dict[str, Any]) -> str:
    lo, hi = result["depths"]
    lines = [
        "# Peak memory against depth",
        "",
        f"`{result['command']}`",
        "",
        f"Random Llama, width {WIDTH}, intermediate {INTERMEDIATE}, vocabulary {VOCAB}, "
        "safetensors; 4 x 128 calibration tokens (embedded corpus); a fresh process per row. "
        f"{hi - lo} more blocks are {result['more_blocks_mb']:.0f} MB of fp32 weights.",
        "",
        f"| recipe | mode | peak RSS {lo} blocks (MB) | peak RSS {hi} blocks (MB) "
        f"| difference (MB) | s ({lo}) | s ({hi}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['recipe']} | {r['mode']} | {r[f'rss_{lo}']:.0f} | {r[f'rss_{hi}']:.0f} | "
            f"{r[f'rss_{hi}'] - r[f'rss_{lo}']:+.0f} | {r[f's_{lo}']:.1f} | {r[f's_{hi}']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipes", default="gptq,gptaq-exact")
    ap.add_argument("--modes", default="lazy,whole")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where to write the files")
    ap.add_argument("--name", default="big-models")
    ap.add_argument("--depths", default="4,16", help="the two block counts compared")
    args = ap.parse_args()
    lo, hi = sorted(int(n) for n in args.depths.split(","))
    blocks = 2 * WIDTH**2 + 2 * 256 * WIDTH + 3 * WIDTH * INTERMEDIATE
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/big_models.py", *sys.argv[1:]]),
        "depths": [lo, hi],
        "more_blocks_mb": (hi - lo) * blocks * 4 / 1e6,
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        models = {n: build(n, where) for n in (lo, hi)}
        for recipe in args.recipes.split(","):
            for mode in args.modes.split(","):
                row: dict[str, Any] = {"recipe": recipe, "mode": mode}
                for n, model in models.items():
                    m = measure(model, recipe, mode, where / f"q-{recipe}-{mode}-{n}")
                    row[f"rss_{n}"], row[f"s_{n}"] = m["maxrss_mb"], m["seconds"]
                    print(recipe, mode, n, m, flush=True)
                result["rows"].append(row)
                args.results.mkdir(parents=True, exist_ok=True)
                (args.results / f"{args.name}.json").write_text(json.dumps(result, indent=2))
                (args.results / f"{args.name}.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
