"""GGUF export for llama.cpp and ollama (with the ``gguf`` package we read GGUF with).

The quantized Linears become Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks holding our codes, or
K-quant super-blocks for layers fitted on a K-quant grid (``--kquant``; their fallback layers
get the 32-weight type their spec maps to) (:mod:`compensator.io.gguf_blocks`; the type
follows the scheme, ``gguf_type`` overrides), everything else is written as F32. q_proj and k_proj rows are permuted as llama.cpp's
converter does (rows are independent, so codes and group parameters permute with them).
Metadata and the tokenizer are copied from a GGUF of the base model: the one the model was
loaded from (the built-in SmolLM2 is one), or ``base`` when given; writing a tokenizer from
Hugging Face files is llama.cpp's converter's job and not done here. Llama-family models only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np
import torch

from compensator.errors import CompensatorError
from compensator.io.atomic import GGUF_MARK
from compensator.io.formats import ExportSource, Format, register_format
from compensator.io.gguf_blocks import BLOCK, TYPES, auto_type, encode, encode_k, holds
from compensator.io.native import unique_state_dict
from compensator.models.loading import gguf_source
from compensator.nn.quant_linear import QuantLinear
from compensator.quant.kquant import KTYPES
from compensator.quant.spec import QuantSpec

FILE_TYPES = {
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    # The K-quants as llama-quantize --pure names them (one type for every block Linear).
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_S,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
}
_KEPT_OUT = ("GGUF.", "general.architecture", "general.file_type", "compensator.")


@register_format
class GGUF(Format):
    name: ClassVar[str] = "gguf"
    summary: ClassVar[str] = "Q4_0 / Q4_1 / Q5_x / Q8_0 and K-quant blocks for llama.cpp and ollama"
    path_is_file: ClassVar[bool] = True

    def __init__(self, gguf_type: str = "auto", base: str | None = None) -> None:
        if gguf_type != "auto" and gguf_type not in TYPES:
            raise CompensatorError(
                f"--gguf-type {gguf_type} is not valid: use auto, {', '.join(TYPES)}"
            )
        self.gguf_type, self.base = gguf_type, base

    def _type(self, spec: QuantSpec) -> str:
        # A K-quant request covers the fallback layers of a K-quant run with their own type.
        if self.gguf_type == "auto" or (self.gguf_type in KTYPES and spec.kquant is None):
            return auto_type(spec)
        return self.gguf_type

    def refusal(self, name: str, record: dict[str, Any]) -> str | None:
        if record.get("format") != "uniform":
            return f"its {record.get('format')} weights (codebooks) have no GGUF block form"
        if record.get("rank"):
            return f"its rank-{record['rank']} low-rank factors would be lost"
        if record.get("rotation"):
            return "its online input rotation would be lost"
        if record.get("bias"):
            return "its bias has no place in this exporter's llama layout"
        if record.get("activations"):
            return "its activation quantizer would be lost (llama.cpp quantizes activations its own way)"
        spec = QuantSpec(**record["spec"])
        if spec.scale_dtype == "float32" and spec.kquant is None:
            return "its float32 scales are not exact in GGUF's float16 block scales"
        gs = spec.group_size
        if gs is not None and gs % BLOCK and spec.kquant is None:
            return f"its g{gs} groups do not fill whole {BLOCK}-weight blocks"
        qtype = self._type(spec)
        if not holds(spec, qtype):
            if qtype in KTYPES:
                return (
                    f"{qtype} holds only codes fitted on its grid: quantize with --kquant {qtype}"
                )
            if spec.kquant is not None:
                return f"its {spec.kquant} codes are held by {spec.kquant} only"
            if spec.float_min:
                return f"{qtype} cannot hold its float mins (Q4_1 and Q5_1 can)"
            sym = "symmetric" if spec.symmetric else "asymmetric"
            return f"{qtype} cannot hold its {sym} {spec.bits}-bit codes"
        return None

    def check(self, source: ExportSource) -> None:
        if self.gguf_type in KTYPES and not any(
            r.get("spec", {}).get("kquant") == self.gguf_type for r in source.records.values()
        ):
            raise CompensatorError(
                f"--gguf-type {self.gguf_type} holds only codes fitted on its grid, and no layer "
                f"was: quantize with --kquant {self.gguf_type}"
            )
        super().check(source)
        config = source.model.config
        if config.model_type != "llama":
            raise CompensatorError(
                f"GGUF export supports llama-family models; this one is {config.model_type!r}"
            )
        for name in source.records:
            width = source.model.get_submodule(name).in_features
            if width % BLOCK:
                raise CompensatorError(
                    f"gguf cannot hold {name}: its {width}-column rows are not whole {BLOCK}-weight blocks"
                )
        self._base_reader(source)

    def _base_reader(self, source: ExportSource) -> gguf.GGUFReader:
        base = self.base or source.quantization_config.get("base_model") or ""
        path = Path(base) if self.base else gguf_source(str(base))
        if path is None or not path.is_file():
            raise CompensatorError(
                f"GGUF export copies the tokenizer and metadata from a GGUF of the base model, "
                f"and {base!r} is not one; pass --gguf-base FILE.gguf"
            )
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        for key in (f"{arch}.block_count", f"{arch}.embedding_length"):
            if key not in reader.fields:
                raise CompensatorError(f"{path} is not a GGUF of this model (it has no {key})")
        check_metadata(reader, source.model.config, path)
        return reader

    def write(self, source: ExportSource, target: Path) -> None:
        reader = self._base_reader(source)
        model, config = source.model, source.model.config
        types = {self._type(QuantSpec(**r["spec"])) for r in source.records.values()}
        ktypes = types & set(KTYPES)
        if ktypes:  # fallback layers do not change what the file is called
            types = ktypes
        writer = gguf.GGUFWriter(target, "llama")
        for key, field in reader.fields.items():
            if not key.startswith(_KEPT_OUT):
                sub = field.types[1] if len(field.types) > 1 else None
                writer.add_key_value(key, field.contents(), field.types[0], sub)
        # What tells a later --force that this file is ours to replace.
        writer.add_string(GGUF_MARK, str(source.quantization_config.get("compensator_version")))
        writer.add_file_type(
            FILE_TYPES[types.pop()] if len(types) == 1 else gguf.LlamaFileType.ALL_F32
        )
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        heads = (config.num_attention_heads, config.num_key_value_heads)
        quantized = set(source.records)
        for key, tensor in unique_state_dict(model).items():
            module = key.rsplit(".", 1)[0]
            if module in quantized and not key.endswith(".qweight"):
                continue  # a layer's scales and zeros go into its blocks
            out_name = names.get_name(module + ".weight" if module in quantized else key,
                                      try_suffixes=(".weight", ".bias"))  # fmt: skip
            if out_name is None:
                raise CompensatorError(f"gguf has no tensor name for {key}")
            if module in quantized:
                data, qtype = self._blocks(model.get_submodule(module), module, heads)
                writer.add_tensor(out_name, data, raw_dtype=TYPES[qtype])
            else:
                writer.add_tensor(out_name, tensor.float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def _blocks(
        self, layer: QuantLinear, name: str, heads: tuple[int, int]
    ) -> tuple[np.ndarray, str]:
        qw = layer.quantized_weight()
        qtype = self._type(layer.spec)
        codes, scale, zero = qw.codes, qw.params.scale, qw.params.zero
        if qtype not in KTYPES:  # the 32-weight blocks take them per column
            gi = layer.spec.group_of_columns(layer.in_features)
            scale, zero = scale[:, gi], zero[:, gi]
        n_head = heads[0] if name.endswith("q_proj") else heads[1]
        if name.endswith(("q_proj", "k_proj")):
            codes, scale, zero = (_permute(t, n_head) for t in (codes, scale, zero))
        blocks = encode_k if qtype in KTYPES else encode
        return blocks(codes.numpy(), scale.numpy(), zero.numpy(), qtype), qtype


def _config_values(config: Any) -> dict[str, Any]:
    """What the GGUF metadata copied from the base must say, from the checkpoint's config,
    by the key's name after ``<arch>.``."""
    rope = getattr(config, "rope_parameters", None) or {}
    heads = config.num_attention_heads
    return {
        "block_count": config.num_hidden_layers,
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": heads,
        "attention.head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        "rope.freq_base": rope.get("rope_theta", getattr(config, "rope_theta", None)),
        "rope.dimension_count": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "rope.scaling.factor": rope.get("factor"),
        "vocab_size": config.vocab_size,
    }


def check_metadata(reader: gguf.GGUFReader, config: Any, path: Path) -> None:
    """Refuse a base GGUF whose copied metadata contradicts the checkpoint's config (llama.cpp
    and transformers would run the exported weights with the base's rope base or norm
    epsilon, and give other logits without a word), naming the first field that differs."""
    arch = reader.fields["general.architecture"].contents()
    for name, want in _config_values(config).items():
        field = reader.fields.get(f"{arch}.{name}")
        if field is None or want is None:
            continue
        got = field.contents()
        same = got == want if isinstance(want, int) else np.isclose(got, want, rtol=1e-6, atol=0)
        if not same:
            raise CompensatorError(
                f"--gguf-base {path} says {arch}.{name} = {got} but the checkpoint's config has "
                f"{want}: it is a GGUF of another model; pass the base model's own GGUF"
            )


def _permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for q/k (rotary halves interleaved per head)."""
    out = rows.shape[0]
    return (
        rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )
