"""QuaRot-style rotation of a whole model, exact in full precision.

With Q orthogonal (d x d) and the residual stream carried as h Q instead of h:
- every RMSNorm scale is folded into the Linears that read the norm (W diag(g)), leaving
  unit-scale norms, which commute with Q (||h Q|| = ||h||);
- the embedding becomes E Q, every Linear reading the stream W Q, every Linear writing to
  it Q^T W (bias Q^T b), the LM head W diag(g_final) Q (untied from the embedding first);
- optionally each value head is rotated by a Hadamard H of the head width (v_proj H^T per
  head, o_proj H per head; attention mixes tokens, never features, so this is exact);
- optionally down_proj's input is rotated online: x K with K a Hadamard of the MLP width
  and the weight W K (a :class:`RotatedLinear`); likewise o_proj's input (QuaRot's online
  Hadamard across heads; here one of the full attention width, which also mixes heads,
  since a Hadamard of the head count often does not exist: 9 heads in SmolLM2-135M).
Outlier features of the stream are spread over all features, which is what lets 4-bit
activations work. Everything is computed in float64 and stored back in the model's dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compensator.errors import CompensatorError
from compensator.nn.layers import replace_module
from compensator.nn.rotated import RotatedLinear
from compensator.transforms.hadamard import hadamard_factors, random_orthogonal, random_rotation
from compensator.types import RotationLayout

log = logging.getLogger(__name__)


def _linear(root: nn.Module, path: str) -> nn.Linear:
    module = root.get_submodule(path)
    if not isinstance(module, nn.Linear) or isinstance(module, RotatedLinear):
        raise CompensatorError(
            f"cannot rotate: {path} is {type(module).__name__}, not a plain nn.Linear "
            "(was the model already rotated or quantized?)"
        )
    return module


def _norm_scale(root: nn.Module, path: str) -> torch.Tensor:
    norm = root.get_submodule(path)
    weight = getattr(norm, "weight", None)
    if "RMSNorm" not in type(norm).__name__ or weight is None or getattr(norm, "bias", None):
        raise CompensatorError(
            f"cannot rotate: {path} is {type(norm).__name__}; the rotation needs an RMSNorm "
            "with a scale and no bias"
        )
    return weight


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def _fold_reader(linear: nn.Linear, scale: torch.Tensor, q: torch.Tensor) -> None:
    """W <- W diag(scale) Q for a Linear reading the normalized stream."""
    _set(linear.weight, (linear.weight.double() * scale.double()[None, :]) @ q)


def _fold_writer(linear: nn.Linear, q: torch.Tensor) -> None:
    """W <- Q^T W, b <- Q^T b for a Linear adding to the stream."""
    _set(linear.weight, q.T @ linear.weight.double())
    if linear.bias is not None:
        _set(linear.bias, q.T @ linear.bias.double())


def _head_matrix(n_heads: int, head: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*[head] * n_heads)


def _untie_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None:
        raise CompensatorError("cannot rotate: the model has no output embeddings (LM head)")
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
        text_config = getattr(model.config, "text_config", None)
        if text_config is not None and hasattr(text_config, "tie_word_embeddings"):
            text_config.tie_word_embeddings = False
    return head


def _rotate_online(block: nn.Module, path: str, generator: torch.Generator) -> None:
    """Fold a Hadamard K (random orthogonal where none is known) into the Linear at ``path``
    as W K and make it rotate its input online."""
    linear = _linear(block, path)
    factors = hadamard_factors(linear.in_features)
    if factors is None:  # stored dense: one factor, the other 1 x 1
        factors = (random_orthogonal(linear.in_features, generator), torch.ones(1, 1))
    k = torch.kron(factors[0].double(), factors[1].double())
    _set(linear.weight, linear.weight.double() @ k)
    replace_module(block, path, RotatedLinear(linear, *factors))


@torch.no_grad()
def rotate_model(
    model: nn.Module,
    blocks: nn.ModuleList,
    layout: RotationLayout,
    *,
    seed: int = 0,
    rotation: str = "hadamard",
    heads: bool = True,
    online_down: bool = True,
    online_o: bool = False,
) -> None:
    """Rotate ``model`` (decoder ``blocks`` laid out as ``layout``) in place (see the module
    docstring); FP outputs are unchanged."""
    config = model.config
    d = config.hidden_size
    g = torch.Generator().manual_seed(seed)
    q = (random_rotation(d, g) if rotation == "hadamard" else random_orthogonal(d, g)).double()
    if hadamard_factors(d) is None and rotation == "hadamard":
        log.warning("no Hadamard matrix of order %d is known here: random orthogonal instead", d)

    head = _untie_head(model)
    emb = model.get_input_embeddings()
    final = _norm_scale(model, layout.final_norm)
    _fold_reader(head, final, q)
    final.data.fill_(1.0)
    _set(emb.weight, emb.weight.double() @ q)

    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    head_rot = (
        random_rotation(head_dim, torch.Generator().manual_seed(seed + 1)).double()
        if heads
        else None
    )
    for block in blocks:
        for norm_path, readers, writer in (
            (layout.attn_norm, layout.attn_inputs, layout.attn_output),
            (layout.mlp_norm, layout.mlp_inputs, layout.mlp_output),
        ):
            scale = _norm_scale(block, norm_path)
            for path in readers:
                _fold_reader(_linear(block, path), scale, q)
            scale.data.fill_(1.0)
            _fold_writer(_linear(block, writer), q)
        if head_rot is not None:
            value, out = _linear(block, layout.value), _linear(block, layout.attn_output)
            hv = _head_matrix(value.out_features // head_dim, head_rot)
            _fold_writer(value, hv)
            _set(
                out.weight,
                out.weight.double() @ _head_matrix(out.in_features // head_dim, head_rot),
            )
        online = (online_o, layout.attn_output, 3), (online_down, layout.mlp_output, 2)
        for enabled, path, seed_offset in online:
            if enabled:
                _rotate_online(block, path, torch.Generator().manual_seed(seed + seed_offset))
