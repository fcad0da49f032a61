"""Where the decoder blocks and their Linear layers live, per model family.

Declarative on purpose: a family is a few dotted names, so supporting a new one never means
copying model code or tracing it, and a transformers release that renames a layer degrades to
the generic adapter instead of silently skipping weights.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass

from torch import nn

from compensator.errors import CompensatorError
from compensator.types import RotationLayout

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "ArchSpec", "ModelAdapter", "RotationLayout", "Tail", "get_adapter"]


class UnsupportedModelError(CompensatorError):
    """The model has no decoder-block list with nn.Linear layers that we could quantize."""


@dataclass(frozen=True)
class Tail:
    """A Linear whose output is its parent sublayer's output, so that the parent's output
    can be had from the Linear's input alone: ``o_proj`` of attention (``pair``: the parent
    returns (output, attention weights)), ``down_proj`` of an MLP."""

    linear: str
    pair: bool = False


@dataclass(frozen=True)
class ArchSpec:
    """Where one family keeps its decoder blocks and how their Linear layers are ordered.

    ``groups`` lists Linear layers relative to a block in "true sequential" order: layers in
    one group read the same input and are quantized together; a later group reads what the
    earlier groups produced, so it is calibrated on already-quantized outputs. A name with
    ``*`` is a pattern (experts: ``mlp.experts.*.gate_proj``) and may match no Linear (a dense
    layer of a mostly sparse model); a plain name must exist.
    ``alt_blocks`` are further candidate paths tried after ``blocks`` (multimodal wrappers
    nest the text decoder one level deeper). ``rotation`` is set for the families whose
    blocks a residual rotation keeps exact (pre-norm RMSNorm, no norm after a sublayer).
    ``tails`` and ``feeds`` let a calibration pass skip work whose result it already has
    (:mod:`compensator.pipeline.reuse`): ``feeds`` pairs a child of the block with the
    sublayer that alone reads its output (the norm before attention), so that it need not
    run while that sublayer's output is handed back. A wrong entry is caught by the
    reuse-on/off bit-identity test of each family.
    """

    name: str
    blocks: str
    groups: tuple[tuple[str, ...], ...]
    alt_blocks: tuple[str, ...] = ()
    rotation: RotationLayout | None = None
    tails: tuple[Tail, ...] = ()
    feeds: tuple[tuple[str, str], ...] = ()


_LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


_ATTENTION_TAIL = Tail("self_attn.o_proj", pair=True)
_MLP_TAIL = Tail("mlp.down_proj")
_ATTENTION_FED = ("input_layernorm", "self_attn")


def _llama_like(
    name: str, *alt_blocks: str, rotation: bool = False, mlp_norm: str = "post_attention_layernorm"
) -> ArchSpec:
    return ArchSpec(
        name=name,
        blocks="model.layers",
        groups=_LLAMA_GROUPS,
        alt_blocks=alt_blocks,
        rotation=RotationLayout() if rotation else None,
        tails=(_ATTENTION_TAIL, _MLP_TAIL),
        feeds=(_ATTENTION_FED, (mlp_norm, "mlp")),
    )


def _moe_like(name: str, mlp: str) -> ArchSpec:
    experts = f"{mlp}.experts.*"
    return ArchSpec(
        name=name,
        blocks="model.layers",
        groups=(
            _LLAMA_GROUPS[0],
            _LLAMA_GROUPS[1],
            (f"{experts}.gate_proj", f"{experts}.up_proj", f"{mlp}.gate_proj*", f"{mlp}.up_proj*"),
            (f"{experts}.down_proj", f"{mlp}.down_proj*"),
        ),
        rotation=None,
        tails=(_ATTENTION_TAIL,),
        feeds=(_ATTENTION_FED,),
    )


_DEEPSEEK_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj*", "self_attn.q_a_proj*", "self_attn.kv_a_proj_with_mqa"),
    ("self_attn.q_b_proj*", "self_attn.kv_b_proj"),
    ("self_attn.o_proj",),
    ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj", "mlp.shared_experts.gate_proj*",
     "mlp.shared_experts.up_proj*", "mlp.gate_proj*", "mlp.up_proj*"),
    ("mlp.experts.*.down_proj", "mlp.shared_experts.down_proj*", "mlp.down_proj*"),
)  # fmt: skip


def _deepseek_v3() -> ArchSpec:
    """Multi-head latent attention (low-rank q and kv projections, each normed before its
    up-projection; q_proj itself when q_lora_rank is unset), then a dense MLP in the first
    blocks and routed plus shared experts after; ``*`` marks names only some blocks have."""
    return ArchSpec(
        name="deepseek_v3", blocks="model.layers", groups=_DEEPSEEK_GROUPS,
        tails=(_ATTENTION_TAIL,), feeds=(_ATTENTION_FED,),
    )  # fmt: skip


# Gemma3ForConditionalGeneration keeps its text decoder at model.language_model.layers
# (transformers 5.x); Gemma3ForCausalLM at model.layers. Either class may carry either config.
_GEMMA3_ALT = "model.language_model.layers"
# Gemma 2/3 norm attention's output (post_attention_layernorm) and norm again before the MLP.
_GEMMA2_MLP_NORM = "pre_feedforward_layernorm"

ARCHITECTURES: dict[str, ArchSpec] = {
    # Gemma normalizes with (1 + w) and scales embeddings, Gemma 2/3 also normalize sublayer
    # outputs: no rotation layout for them yet.
    "llama": _llama_like("llama", rotation=True),
    "mistral": _llama_like("mistral", rotation=True),
    "qwen2": _llama_like("qwen2", rotation=True),
    "qwen3": _llama_like("qwen3", rotation=True),
    "gemma": _llama_like("gemma"),
    "gemma2": _llama_like("gemma2", mlp_norm=_GEMMA2_MLP_NORM),
    "gemma3": _llama_like("gemma3", _GEMMA3_ALT, mlp_norm=_GEMMA2_MLP_NORM),
    "gemma3_text": _llama_like("gemma3_text", _GEMMA3_ALT, mlp_norm=_GEMMA2_MLP_NORM),
    "phi3": ArchSpec(
        name="phi3",
        blocks="model.layers",
        groups=(
            ("self_attn.qkv_proj",),
            ("self_attn.o_proj",),
            ("mlp.gate_up_proj",),
            ("mlp.down_proj",),
        ),
        tails=(_ATTENTION_TAIL, _MLP_TAIL),
        feeds=(_ATTENTION_FED, ("post_attention_layernorm", "mlp")),
    ),
    # Sparse blocks, with their fused experts unfused first (compensator.nn.experts); the
    # routers (mlp.gate) are not Linears and stay in full precision. Qwen3-MoE's dense layers
    # (mlp_only_layers, decoder_sparse_step) match the plain mlp.* patterns instead.
    "qwen3_moe": _moe_like("qwen3_moe", "mlp"),
    "mixtral": _moe_like("mixtral", "mlp"),
    "deepseek_v3": _deepseek_v3(),
    "opt": ArchSpec(
        name="opt",
        blocks="model.decoder.layers",
        groups=(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
        # Its attention norm comes before or after attention as the config says: not declared.
        tails=(Tail("self_attn.out_proj", pair=True),),
    ),
}

LinearGroups = list[list[tuple[str, nn.Linear]]]


class ModelAdapter:
    """Finds blocks and Linear layers of one model; built by :func:`get_adapter`."""

    def __init__(self, arch: ArchSpec, *, is_generic: bool = False) -> None:
        self.arch = arch
        self.is_generic = is_generic

    def __repr__(self) -> str:
        return f"ModelAdapter({self.arch.name!r}, blocks={self.arch.blocks!r}, generic={self.is_generic})"

    def embedding(self, model: nn.Module) -> nn.Module:
        # Every PreTrainedModel implements this, multimodal wrappers included.
        return model.get_input_embeddings()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = _get_module_list(model, self.arch.blocks)
        if blocks is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no nn.ModuleList at '{self.arch.blocks}' "
                f"(adapter {self.arch.name!r}); was the adapter built for a different model?"
            )
        return blocks

    def linear_groups(self, block: nn.Module) -> LinearGroups:
        if self.is_generic:
            # One group: every Linear sees inputs captured from the same (unquantized) pass.
            return [_all_linears(block)]
        groups: LinearGroups = []
        linears = _all_linears_dict(block)
        for names in self.arch.groups:
            group: list[tuple[str, nn.Linear]] = []
            for name in names:
                if "*" in name:
                    group += [(n, m) for n, m in linears.items() if fnmatch.fnmatchcase(n, name)]
                    continue
                module = _get_submodule(block, name)
                if not isinstance(module, nn.Linear):
                    raise UnsupportedModelError(
                        f"{type(block).__name__} has no nn.Linear at '{name}' "
                        f"(adapter {self.arch.name!r}); the model's layout may have changed, "
                        "retry with the generic adapter"
                    )
                group.append((name, module))
            if group:
                groups.append(group)
        return groups

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        return {name: lin for group in self.linear_groups(block) for name, lin in group}

    def block_prefix(self, i: int) -> str:
        return f"{self.arch.blocks}.{i}"


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The declared adapter for ``config.model_type``, else the generic one (with a warning)."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", "")) or "<no config.model_type>"
    spec = ARCHITECTURES.get(model_type)
    if spec is not None:
        adapter, problem = _declared_adapter(model, spec)
        if adapter is not None:
            return adapter
        logger.warning(
            "declared layout for model_type %r does not match %s (%s); using the generic adapter",
            model_type,
            type(model).__name__,
            problem,
        )
    adapter = _generic_adapter(model, model_type)
    if spec is None:
        logger.warning(
            "model_type %r has no declared layout; using the generic adapter on '%s' "
            "(all Linear layers of a block quantized together, not true-sequential)",
            model_type,
            adapter.arch.blocks,
        )
    return adapter


def _declared_adapter(model: nn.Module, spec: ArchSpec) -> tuple[ModelAdapter | None, str]:
    """The adapter if ``spec`` matches the model exactly, else None and why not."""
    paths = (spec.blocks, *spec.alt_blocks)
    found = [(p, b) for p in paths if (b := _get_module_list(model, p)) is not None and len(b)]
    if not found:
        return None, f"no decoder blocks at {' or '.join(paths)}"
    path, blocks = found[0]
    adapter = ModelAdapter(dataclasses.replace(spec, blocks=path, alt_blocks=()))
    for block in blocks:
        try:
            declared = set(adapter.linears(block))
        except UnsupportedModelError as err:
            return None, str(err)
        # An undeclared Linear would silently stay in full precision; generic catches it.
        extra = set(_all_linears_dict(block)) - declared
        if extra:
            return None, f"undeclared Linear layers {sorted(extra)}"
    return adapter, ""


def _generic_adapter(model: nn.Module, model_type: str) -> ModelAdapter:
    best: tuple[int, str] | None = None
    for path, module in model.named_modules():
        if not _looks_like_block_list(module):
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if best is None or n_params > best[0]:
            best = (n_params, path)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {model_type!r}) is not supported: no "
            "nn.ModuleList of same-class blocks containing torch.nn.Linear layers was found "
            f"(e.g. GPT-2 uses Conv1D); declared types: {', '.join(sorted(ARCHITECTURES))}"
        )
    arch = ArchSpec(name=f"generic:{model_type}", blocks=best[1], groups=())
    return ModelAdapter(arch, is_generic=True)


def _looks_like_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1:
        return False
    kind = next(iter(kinds))
    # A list of bare Linears (e.g. MoE experts) is part of a block, not a list of blocks.
    if issubclass(kind, nn.Linear):
        return False
    return all(_all_linears_dict(child) for child in module)


def _all_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    return list(_all_linears_dict(block).items())


def _all_linears_dict(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear) and name}


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _get_module_list(root: nn.Module, path: str) -> nn.ModuleList | None:
    module = _get_submodule(root, path)
    return module if isinstance(module, nn.ModuleList) else None
