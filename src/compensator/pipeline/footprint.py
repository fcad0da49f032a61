"""What the block pipeline holds at its peak, from a model's shapes alone (a config.json):
the arithmetic behind ``compensator plan`` and behind where the streams are put.

Every figure is bytes, and follows what :mod:`compensator.pipeline.runner` keeps: one block
(its FP weights, the quantized layers' packed codes and the dense copies they keep while
the block is worked on), the activation streams of every calibration token, one group's
statistics and the solver's workspace, one batch's activations, and for learned steps their
parameters, gradients, Adam state and the activations a backward pass keeps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# (input width, output widths) of one group of Linears that read the same input.
Group = tuple[int, tuple[int, ...]]


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes; MoE models count experts per block."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0
    expert_intermediate: int = 0
    experts_per_token: int = 0
    shared_intermediate: int = 0  # shared experts, all of them side by side
    dense_layers: int = 0  # leading blocks with a dense MLP in an MoE model

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ModelShape:
        """From a transformers config (dict); multimodal configs use their text part."""
        cfg = cfg.get("text_config") or cfg
        d = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        experts = int(
            cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
            or 0
        )  # fmt: skip
        shared = int(cfg.get("n_shared_experts") or 0) * int(cfg.get("moe_intermediate_size") or 0)
        shared = shared or int(cfg.get("shared_expert_intermediate_size") or 0)
        return cls(
            hidden=d,
            intermediate=int(cfg.get("intermediate_size") or 4 * d),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or d // heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            experts=experts,
            expert_intermediate=int(cfg.get("moe_intermediate_size") or 0)
            or (int(cfg.get("intermediate_size") or 0) if experts else 0),
            experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
            shared_intermediate=shared if experts else 0,
            dense_layers=int(cfg.get("first_k_dense_replace") or 0) if experts else 0,
        )

    def groups(self, moe: bool) -> list[tuple[Group, int]]:
        """One block's groups of Linears in true-sequential order, each with how many there
        are of it (one per expert for experts)."""
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn: list[tuple[Group, int]] = [((d, (q, kv, kv)), 1), ((q, (d,)), 1)]
        if not moe:
            f = self.intermediate
            return [*attn, ((d, (f, f)), 1), ((f, (d,)), 1)]
        fe, fs = self.expert_intermediate, self.shared_intermediate
        mlp = [((d, (fe, fe)), self.experts), ((fe, (d,)), self.experts)]
        if fs:
            mlp += [((d, (fs, fs)), 1), ((fs, (d,)), 1)]
        return [*attn, *mlp]

    def moe_blocks(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    def linear_params(self, moe: bool) -> int:
        return sum(n * i * sum(outs) for (i, outs), n in self.groups(moe))

    def block_params(self, moe: bool) -> int:
        router = self.experts * self.hidden if moe else 0
        return self.linear_params(moe) + 2 * self.hidden + router

    def blocks_params(self) -> int:
        moe = self.moe_blocks()
        return moe * self.block_params(True) + (self.layers - moe) * self.block_params(False)

    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def widest_block(self) -> bool:
        """Whether an MoE block (True) or a dense one is the larger."""
        return self.moe_blocks() > 0 and self.block_params(True) >= self.block_params(False)


def stream_bytes(
    shape: ModelShape,
    tokens: int,
    keep_fp: bool,
    reuse: bool,
    itemsize: int = 4,
    wide: bool = True,
) -> int:
    """The activations every calibration token keeps at the peak of a block: the quantized
    stream and its successor; with pass reuse, the kept attention output and a tail's input
    (o_proj's, heads x head_dim wide, or with ``wide`` a dense MLP's down_proj input, of
    intermediate width); with an FP stream, its input and output and the FP input of every
    distinct Linear input (experts': the routed tokens' rows)."""
    d, q = shape.hidden, shape.heads * shape.head_dim
    widths = 2 * d
    if reuse:
        widths += d + max(q, shape.intermediate if wide and not shape.experts else d)
    if keep_fp:
        groups = shape.groups(shape.widest_block())
        widths += 2 * d + sum(i * (shape.experts_per_token if n > 1 else 1) for (i, _), n in groups)
    return tokens * widths * itemsize


@dataclass(frozen=True)
class RunShape:
    """What a quantize run asks of the pipeline, besides the model's shapes."""

    windows: int
    seqlen: int
    batch_size: int = 8
    keep_fp: bool = False  # a step reads the FP stream (GPTAQ, the exact forms, learned)
    statistics: int = 1  # [in, in] statistics per distinct Linear input (H, FP cross terms)
    learned: bool = False  # a block trainer (OmniQuant, SDE, SSVQ)
    epochs: int = 0  # its epochs
    reuse: bool = True
    bits_per_weight: float = 4.17
    weight_itemsize: int = 4  # the model's dtype where it is worked on
    stream_itemsize: int = 4
    lazy: bool = True  # read block by block (local safetensors or GGUF), else loaded whole

    @property
    def tokens(self) -> int:
        return self.windows * self.seqlen


def working_set(shape: ModelShape, run: RunShape) -> dict[str, int]:
    """The work device's share at the peak of the widest block, by component."""
    moe = shape.widest_block()
    linear, wb = shape.linear_params(moe), run.weight_itemsize
    groups = shape.groups(moe)
    widest_in = max(i for (i, _), _n in groups)
    # Every distinct input of a group has its statistics; experts each have their own.
    stats = max(n * i * i for (i, _), n in groups) * 4 * run.statistics
    solver = max(5 * i * i + 3 * i * max(outs) for (i, outs), _n in groups) * 4
    f = shape.expert_intermediate * shape.experts_per_token if moe else shape.intermediate
    batch_tokens = run.batch_size * run.seqlen
    out = {
        "block weights": shape.block_params(moe) * wb,
        "dense copies of quantized layers": linear * 4,
        "packed codes": int(linear * run.bits_per_weight / 8),
        # What the run needs; pass reuse keeps down_proj's input beside it only where it fits.
        "calibration streams": stream_bytes(
            shape, run.tokens, run.keep_fp, run.reuse, run.stream_itemsize, wide=False
        ),
        "statistics": stats,
        "solver workspace": solver,
        "one batch's activations": batch_tokens * (4 * shape.hidden + 3 * f + widest_in) * 4,
    }
    if run.learned:
        out.update(_training(shape, run, linear, batch_tokens, f))
    return out


def _training(
    shape: ModelShape, run: RunShape, linear: int, batch_tokens: int, f: int
) -> dict[str, int]:
    """A block trainer: the fake-quantized weights and their gradients, Adam's two moments
    for the learned parameters (clipping per group, transforms per channel: a few per
    hundred weights), and what one batch's backward keeps (attention probabilities too)."""
    learned_params = linear // 32 + 8 * shape.hidden
    attention = run.batch_size * shape.heads * run.seqlen * run.seqlen * 4
    return {
        "training: weights and gradients": 2 * linear * 4,
        "training: optimizer state": learned_params * 4 * 4,
        "training: saved activations": batch_tokens * (12 * shape.hidden + 4 * f) * 4 + attention,
    }


def resident_weights(shape: ModelShape, run: RunShape) -> int:
    """Model weights held in host memory outside the block being worked on: embeddings,
    final norm and head when read lazily, the whole model when loaded whole."""
    params = shape.outside_params() + (0 if run.lazy else shape.blocks_params())
    return params * run.weight_itemsize


def checkpoint_bytes(shape: ModelShape, run: RunShape) -> int:
    """The saved checkpoint: packed block Linears, everything else as the model holds it."""
    quantized = shape.moe_blocks() * shape.linear_params(True)
    quantized += (shape.layers - shape.moe_blocks()) * shape.linear_params(False)
    rest = shape.outside_params() + shape.blocks_params() - quantized
    return int(quantized * run.bits_per_weight / 8) + rest * run.weight_itemsize
