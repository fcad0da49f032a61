"""compressed-tensors ``pack-quantized`` export: what transformers and vLLM load.

Targets compressed-tensors 0.20 (its own packing helpers and config classes write the
files). Our codes c in [0, 2^b) with zero z dequantize as (c - z) s; compressed-tensors
stores signed values q = c - 2^(b-1) and zero points zp = z - 2^(b-1), the same numbers, so
the export is exact: codes, scales (stored in the model's dtype, fp32 by default, which
holds our fp16 scales exactly) and zero points (packed along the output dimension). A
ragged last group (SmolLM2's 576 = 4 x 128 + 64), which neither the library nor vLLM takes,
is re-grouped exactly to the largest group size dividing every row (g64 there, each g128
scale and zero repeated), unless ``regroup=False``, which refuses instead. Symmetric
layers store no zero point. Dynamic per-token int8 activations (W8A8, W4A8) map to
``input_activations``. Low-rank factors (LQER/L2QER) become a PEFT LoRA adapter in
``lora/`` beside the base (y += (x A) B is LoRA with lora_A = A^T, lora_B = B^T, alpha = r),
when they read what LoRA reads, the unquantized input. Online rotations, VQ, 4-bit or clipped
activations, and factors on quantized activations or a split input are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from compensator.errors import CompensatorError
from compensator.io.formats import ExportSource, Format, register_format
from compensator.io.native import unique_state_dict
from compensator.nn.quant_linear import QuantLinear
from compensator.quant.act import ActSpec
from compensator.quant.spec import QuantSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def exact_group_size(widths: list[int], group_size: int | None) -> int | None:
    """The group size holding ``group_size``'s grids exactly on rows of every width in
    ``widths`` with whole groups only: itself when it divides them all, else its largest
    divisor that does (one size for the whole model: transformers' loader mixes up config
    groups of different sizes); None for per-channel."""
    if group_size is None:
        return None
    return math.gcd(group_size, *widths)


@register_format
class CompressedTensors(Format):
    name: ClassVar[str] = "compressed-tensors"
    summary: ClassVar[str] = "pack-quantized int weights for transformers and vLLM"

    def __init__(self, regroup: bool = True, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise CompensatorError(f"--dtype {dtype} is not valid: use {', '.join(DTYPES)}")
        self.regroup, self.dtype = regroup, DTYPES[dtype]

    def refusal(self, name: str, record: dict[str, Any]) -> str | None:
        if record.get("format") != "uniform":
            return f"its {record.get('format')} weights (codebooks) have no compressed-tensors form"
        lowrank_input = record.get("lowrank_input", "quantized")
        if record.get("rank") and lowrank_input == "split":
            return (
                "its split-input low-rank term (a projection on the quantized path) would be lost"
            )
        if record.get("rank") and record.get("activations") and lowrank_input == "quantized":
            return (
                f"its rank-{record['rank']} factors read the quantized activations, which a LoRA "
                "adapter (reading the unquantized input) cannot reproduce"
            )
        if record.get("rotation"):
            return "its online input rotation would be lost"
        acts = record.get("activations")
        if acts is not None and not _int8_tokens(ActSpec(**acts)):
            return (
                f"its {ActSpec(**acts).label()} activations have no compressed-tensors form "
                "(it holds dynamic symmetric per-token int8 only)"
            )
        spec = record["spec"]
        if QuantSpec(**spec).float_zero:
            what = spec.get("kquant") or "float-min"
            return (
                f"its {what} zero points are not integers (compressed-tensors holds integer "
                "zero points); export it with --format gguf"
            )
        if spec["scale_dtype"] == "bfloat16" and self.dtype != torch.float32:
            return "its bfloat16 scales are not exact in float16; export with --dtype float32"
        return None

    def check(self, source: ExportSource) -> None:
        super().check(source)
        if self.regroup:
            return
        for name, record in source.records.items():
            gs = record["spec"]["group_size"]
            width = source.model.get_submodule(name).in_features
            if gs is not None and width % gs:
                raise CompensatorError(
                    f"compressed-tensors cannot hold {name}: its last group of {width % gs} "
                    f"columns is shorter than g{gs}; drop --no-regroup to re-group it exactly"
                )

    def _widths(self, source: ExportSource) -> list[int]:
        return sorted({source.model.get_submodule(n).in_features for n in source.records})

    def write(self, source: ExportSource, target: Path) -> None:
        model = source.model
        state = unique_state_dict(model)
        groups: dict[str, dict[str, Any]] = {}
        regrouped: set[tuple[int, int]] = set()
        for name in source.records:
            layer = model.get_submodule(name)
            assert isinstance(layer, QuantLinear)
            for key in [k for k in state if k.startswith(f"{name}.")]:
                if key != f"{name}.bias":
                    del state[key]  # the layer's own buffers; written below
            tensors, scheme = self._layer(layer, self._widths(source))
            state.update({f"{name}.{k}": v for k, v in tensors.items()})
            groups.setdefault(json.dumps(scheme, sort_keys=True), {"scheme": scheme, "targets": []})
            groups[json.dumps(scheme, sort_keys=True)]["targets"].append(name)
            gs = layer.spec.group_size
            if gs is not None and scheme["weights"]["group_size"] != gs:
                regrouped.add((gs, scheme["weights"]["group_size"]))
        for old, new in sorted(regrouped):
            source.notes.append(
                f"re-grouped g{old} exactly to g{new} (scales and zeros repeated), as "
                "compressed-tensors and vLLM need whole groups on every row"
            )
        state = {k: _cast(v, self.dtype) for k, v in state.items()}
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = str(self.dtype).removeprefix("torch.")
        config["quantization_config"] = _ct_config(list(groups.values()), model, source)
        (target / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if hasattr(source.tokenizer, "save_pretrained"):
            source.tokenizer.save_pretrained(str(target))
        if any(r.get("rank") for r in source.records.values()):
            _write_lora(source, target / "lora")
            source.notes.append("low-rank factors written as a PEFT LoRA adapter in lora/")

    def _layer(
        self, layer: QuantLinear, widths: list[int]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        qw = layer.quantized_weight()
        spec, bits = layer.spec, layer.spec.bits
        offset = 1 << (bits - 1)
        gs = exact_group_size(widths, spec.group_size)
        scale, zero = qw.params.scale, qw.params.zero
        if gs != spec.group_size:  # repeat each group's grid over its sub-groups
            cols = torch.arange(0, layer.in_features, gs)
            idx = spec.group_of_columns(layer.in_features)[cols]
            scale, zero = scale[:, idx], zero[:, idx]
        signed = (qw.codes - offset).to(torch.int8)
        zp = (zero.round() - offset).to(torch.int8)
        tensors: dict[str, torch.Tensor] = {"weight_scale": scale.to(self.dtype)}
        if bits == 8:  # int-quantized: one int8 per weight, nothing to pack
            tensors["weight"] = signed
            if not spec.symmetric:
                tensors["weight_zero_point"] = zp
        else:
            tensors["weight_packed"] = pack_to_int32(signed, bits)
            tensors["weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
            if not spec.symmetric:
                tensors["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0).contiguous()
        weights = {
            "num_bits": bits,
            "type": "int",
            "symmetric": spec.symmetric,
            "strategy": "channel" if gs is None else "group",
            "group_size": gs,
            "dynamic": False,
        }
        acts = None
        if layer.act_spec is not None:
            acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                    "dynamic": True}  # fmt: skip
        fmt = "int-quantized" if bits == 8 else "pack-quantized"
        return tensors, {"weights": weights, "input_activations": acts, "format": fmt}


def _int8_tokens(spec: ActSpec) -> bool:
    return (
        spec.bits == 8 and spec.granularity == "token" and spec.symmetric and spec.clip_ratio == 1
    )


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _ct_config(groups: list[dict[str, Any]], model: Any, source: ExportSource) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    quantized = set(source.records)
    ignore = sorted(
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in quantized
    )
    config_groups = {
        f"group_{i}": QuantizationScheme(targets=sorted(g["targets"]), **g["scheme"])
        for i, g in enumerate(groups)
    }
    formats = {g["scheme"]["format"] for g in groups}
    config = QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
    )
    out = config.model_dump(exclude_none=True)
    if any(not g["scheme"]["weights"]["symmetric"] for g in groups):
        # transformers builds the compressed model on the meta device, where compressed-
        # tensors 0.20's compress() leaves zero points unpacked, so loading the packed ones
        # fails on a size mismatch; decompressing at load avoids that path (vLLM ignores it).
        out["run_compressed"] = False
    return out


def _write_lora(source: ExportSource, target: Path) -> None:
    """The layers' factors as a PEFT LoRA adapter: y += (x A) B = B^T (A^T x), so
    lora_A = A^T [r, in], lora_B = B^T [out, r], and alpha = r makes PEFT's scale 1."""
    target.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in source.records:
        layer = source.model.get_submodule(name)
        lowrank = layer.lowrank()
        if lowrank is None:
            continue
        a, b = lowrank.factors()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.T.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.T.contiguous()
        ranks[name] = lowrank.rank
    r = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {f"^{n}$": k for n, k in ranks.items() if k != r},
        "alpha_pattern": {f"^{n}$": k for n, k in ranks.items() if k != r},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": source.quantization_config.get("base_model"),
    }
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
