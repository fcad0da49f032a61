"""What ``eval`` reads: a checkpoint or a plain model, and the base model a checkpoint records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from compensator.errors import CompensatorError
from compensator.io.native import is_checkpoint, load_checkpoint, read_quantization_config
from compensator.models.fingerprint import check_fingerprint
from compensator.models.loading import load_model


def load_target(
    target: str | Path, *, require_checkpoint: bool = False, trust_remote_code: bool = False
) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    """A checkpoint or a plain model: (model, tokenizer, a checkpoint's quantization_config)."""
    if require_checkpoint or is_checkpoint(target):
        qc = read_quantization_config(target)["quantization_config"]
        model = load_checkpoint(target)
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(target))
        except (OSError, ValueError):
            tok = load_model(qc["base_model"]).tokenizer
        return model, tok, qc
    loaded = load_model(str(target), trust_remote_code=trust_remote_code)
    return loaded.model, loaded.tokenizer, None


def recorded_base(base: str, recorded: dict[str, Any] | None) -> nn.Module:
    """The base model a checkpoint records, refused unless its bytes are the recorded ones."""
    if recorded is None:  # checkpoints from before fingerprints
        return load_model(base).model
    check_fingerprint(base, recorded, None)  # files: before loading anything
    try:
        model = load_model(base).model
    except CompensatorError:
        raise CompensatorError(
            f"the base model {base} recorded by the checkpoint cannot be loaded; pass the FP "
            "model with --fp (or fp=...) to compute KL against it"
        ) from None
    check_fingerprint(base, recorded, model)  # tensors: once loaded
    return model
