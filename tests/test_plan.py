"""``compensator plan``: shapes counted from a config match the real model's parameters,
the CLI reads only the config, and the docs' table for the Llama-3 family is what the code
computes today."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compensator.cli import main
from compensator.pipeline.footprint import ModelShape, stream_bytes
from compensator.plan import format_plan, plan
from compensator.recipes.recipe import load_recipe

DOCS = Path(__file__).resolve().parents[1] / "docs" / "big-models.md"

# Published shapes (the models' config.json on the hub).
LLAMA3 = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    "Llama-3.1-405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8),
}  # fmt: skip
PUBLISHED_PARAMS = {"Llama-3-8B": 8.03e9, "Llama-3-70B": 70.6e9, "Llama-3.1-405B": 405.9e9}


def _llama3(name: str, where: Path) -> Path:
    cfg = {"model_type": "llama", "vocab_size": 128256, "tie_word_embeddings": False,
           **LLAMA3[name]}  # fmt: skip
    directory = where / name
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _tiny(kind: str) -> torch.nn.Module:
    import transformers

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96)  # fmt: skip
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            head_dim=16, decoder_sparse_step=1, mlp_only_layers=[],
        )  # fmt: skip
        return transformers.Qwen3MoeForCausalLM(cfg)
    cfg = transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe", "mixtral"])
def test_shapes_count_the_real_models_parameters(kind: str) -> None:
    model = _tiny(kind)
    shape = ModelShape.from_config(model.config.to_dict())
    total = sum(p.numel() for p in model.parameters())
    # Norms of q/k (Qwen3) are not Linears: the count may miss those few.
    assert total - 2 * 16 * 3 <= shape.outside_params() + shape.blocks_params() <= total


@pytest.mark.parametrize("name", sorted(LLAMA3))
def test_llama3_shapes_give_the_published_sizes(name: str, tmp_path: Path) -> None:
    p = plan(str(_llama3(name, tmp_path)), load_recipe("gptq"), 128, 2048)
    assert p["params"] == pytest.approx(PUBLISHED_PARAMS[name], rel=0.003)
    assert p["read"] == "block by block"


def test_streams_grow_with_an_fp_stream_and_tokens() -> None:
    shape = ModelShape(576, 1536, 30, 9, 3, 64, 49152, True)
    q = stream_bytes(shape, 1000, keep_fp=False, reuse=False)
    assert q == 1000 * 2 * 576 * 4  # the stream entering the block and the one leaving it
    fp = stream_bytes(shape, 1000, keep_fp=True, reuse=False)
    # plus the FP stream in and out, and every distinct FP Linear input (576 x 3 + 1536)
    assert fp - q == 1000 * (2 * 576 + 3 * 576 + 1536) * 4
    assert stream_bytes(shape, 2000, keep_fp=True, reuse=True) > 2 * fp


def test_a_learned_recipe_plans_its_training_state(tmp_path: Path) -> None:
    model = str(_llama3("Llama-3-8B", tmp_path))
    gptq = plan(model, load_recipe("gptq"), 128, 2048)
    omni = plan(model, load_recipe("omniquant"), 128, 2048)
    assert "training: optimizer state" in omni["cpu"]["parts"]
    assert omni["cpu"]["peak"] > gptq["cpu"]["peak"]
    assert omni["seconds"]["training"] > 0 == gptq["seconds"]["training"]


def test_cli_plan_reads_only_the_config(tmp_path: Path) -> None:
    model = _llama3("Llama-3-8B", tmp_path)
    res = CliRunner().invoke(main, ["plan", str(model), "--calib-windows", "128", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert (
        got["cpu"]["peak"] > got["cpu"]["parts"]["resident weights"] > 1e9
    )  # 2 x 128256 x 4096 x 4
    whole = CliRunner().invoke(main, ["plan", str(model), "--whole", "--json"])
    assert json.loads(whole.stdout)["cpu"]["peak"] > 32e9  # 8B params of fp32
    res = CliRunner().invoke(main, ["plan", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "plan reads a local config" in res.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    res = CliRunner().invoke(main, ["plan", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "its config lacks" in res.output


def plan_table(where: Path) -> str:
    """The docs' table: GPTQ and gptaq-exact W4 g128, 128 x 2048 calibration tokens."""
    rows = [
        "| model | recipe | params | CPU peak RSS | GPU peak (streams on GPU / on CPU) "
        "| disk peak | CPU time (2 threads, rough) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in LLAMA3:
        model = str(_llama3(name, where))
        for recipe in ("gptq", "gptaq-exact"):
            p = plan(model, load_recipe(recipe), 128, 2048)
            line = format_plan(p).splitlines()
            cpu = re.search(r"peak RSS (\S+ GB)", line[1])
            gpu = re.findall(r"(\S+ GB) with", line[2])
            disk = re.search(r"(\S+ GB) at the peak", line[3])
            time = re.search(r"rough\)\s+(\S+ \S+):", line[4])
            assert cpu and disk and time and len(gpu) == 2, line
            rows.append(
                f"| {name} | {recipe} | {p['params'] / 1e9:.1f}B | {cpu[1]} | {gpu[0]} / {gpu[1]} "
                f"| {disk[1]} | {time[1]} |"
            )
    return "\n".join(rows)


def test_the_docs_table_is_what_the_code_computes(tmp_path: Path) -> None:
    table = plan_table(tmp_path)
    assert table in DOCS.read_text(), f"regenerate docs/big-models.md's plan table:\n{table}"


DIST_DOCS = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def test_exchange_follows_the_engines_rules() -> None:
    from compensator.pipeline.exchange import exchange
    from compensator.pipeline.footprint import ModelShape, RunShape

    shape = ModelShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16,
                       vocab=128, tied=True)  # fmt: skip
    x = exchange(shape, RunShape(windows=8, seqlen=32), 2, group_size=16)
    # q/k/v, o, gate/up read 64-wide inputs, down a 96-wide one: one float32 H each
    assert x["all_reduce_bytes_per_block"] == 4 * (3 * 64 * 64 + 96 * 96)
    assert x["all_reduce_traffic_per_rank"] == x["all_reduce_bytes_per_block"]  # 2 (N-1)/N = 1
    weights = shape.linear_params(False)
    assert x["broadcast_bytes_per_block"] == int(weights * (1 + 8 / 16))
    assert [g["split"] for g in x["groups"]] == ["rows"] * 4  # one set per group < 2 ranks
    # each share inverts its Hessian again: less than 2x, more than 1x
    assert 1.2 < x["rounding_speedup"] < 2.0
    down = x["groups"][3]  # 64 rows over 2 ranks, the 96^3 inverse on both
    assert down["speedup"] == pytest.approx((2 * 64 * 96**2 + 96**3) / (2 * 32 * 96**2 + 96**3))
    moe = ModelShape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16,
                     vocab=128, tied=True, experts=3, expert_intermediate=32,
                     experts_per_token=1)  # fmt: skip
    y = exchange(moe, RunShape(windows=8, seqlen=32), 2, group_size=16)
    experts = [g for g in y["groups"] if g["count"] == 3]
    assert [g["split"] for g in experts] == ["whole sets"] * 2
    assert all(g["imbalance"] == pytest.approx(4 / 3) for g in experts)  # 2 + 1 of 3 sets


def distributed_table(where: Path) -> str:
    """docs/distributed.md's table: Llama-3-70B, GPTQ and gptaq-exact W4 g128, 128 x 2048."""
    rows = [
        "| ranks | recipe | per-rank CPU peak | per-rank GPU peak (streams on GPU) "
        "| all-reduced per block | sent per rank per block | broadcast per block "
        "| rounding speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    model = str(_llama3("Llama-3-70B", where))
    for ranks in (1, 8):
        for recipe in ("gptq", "gptaq-exact"):
            p = plan(model, load_recipe(recipe), 128, 2048, ranks=ranks)
            x = p.get("ranks")
            gb = lambda v: f"{v / 1e9:.2f} GB"  # noqa: E731
            rows.append(
                f"| {ranks} | {recipe} | {gb(p['cpu']['peak'])} | {gb(p['cuda']['peak'])} | "
                + (
                    f"{gb(x['all_reduce_bytes_per_block'])} | "
                    f"{gb(x['all_reduce_traffic_per_rank'])} | "
                    f"{gb(x['broadcast_bytes_per_block'])} | {x['rounding_speedup']:.2f}x |"
                    if x
                    else "- | - | - | 1x |"
                )
            )
    return "\n".join(rows)


def test_the_distributed_docs_table_is_what_the_code_computes(tmp_path: Path) -> None:
    table = distributed_table(tmp_path)
    assert table in DIST_DOCS.read_text(), f"regenerate docs/distributed.md's table:\n{table}"
