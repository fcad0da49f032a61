"""``finetune``: distil a saved checkpoint's base model into its trainable tensors.

Order of work, so that teacher and student are never resident together: options and data are
checked and tokenized first; the teacher (the checkpoint's recorded base model, its
fingerprint checked, or ``teacher``) runs once over the training windows and its top-k
targets are cached, memory-mapped, in the run state; it is freed; the checkpoint is loaded,
the declared parts attached, trained, committed in their stored dtypes, and saved as a normal
checkpoint (manifest included) whose ``quantization_config.finetune`` says what was trained on
what. docs/finetune.md has the measurements behind the defaults.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compensator.errors import CompensatorError, RunInterrupted
from compensator.io.atomic import check_out, state_dir
from compensator.io.native import MANIFEST, load_checkpoint, read_quantization_config
from compensator.io.native import WEIGHTS_FILE as WEIGHTS
from compensator.io.native import save_checkpoint as write_checkpoint_dir
from compensator.io.targets import recorded_base
from compensator.models.checks import check_seqlen_within
from compensator.models.fingerprint import file_sha256, source_fingerprint, tensor_sha256
from compensator.models.loading import load_model
from compensator.tune.loop import Schedule, TrainLog, train
from compensator.tune.parts import attach, check_parts, commit
from compensator.tune.spec import TuneConfig, parse_parts
from compensator.tune.state import TuneState
from compensator.tune.teacher import TeacherCache, build_cache, open_cache
from compensator.tune.windows import training_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneRun:
    """How a fine-tuning run behaves (not what it computes): the face fills it in."""

    version: str
    force: bool = False
    restart: bool = False
    progress: bool = True
    device: str | torch.device = "cpu"


def run_finetune(
    checkpoint: str | Path,
    out: str | Path,
    config: TuneConfig | None,
    run: TuneRun,
) -> Path:
    """:func:`compensator.finetune` (its docstring says what it does)."""
    cfg = config or TuneConfig()
    if not isinstance(cfg, TuneConfig):
        raise CompensatorError(f"config must be a TuneConfig, got {type(cfg).__name__}")
    cfg.check()
    check_out(out, run.force, protect=(checkpoint,))
    t0 = time.perf_counter()
    full = read_quantization_config(checkpoint)  # a damaged checkpoint fails here
    qc = full["quantization_config"]
    check_seqlen_within(cfg.seqlen, full.get("max_position_embeddings"))
    parts = parse_parts(cfg.train)
    # What the layers hold, checked before the teacher's pass (then the student is freed).
    check_parts(load_checkpoint(checkpoint), parts, explicit=cfg.train is not None)
    tokenizer = _tokenizer(Path(checkpoint), qc)
    windows, data = training_windows(
        tokenizer, cfg.data, qc.get("calibration"), cfg.windows, cfg.seqlen, cfg.seed
    )
    teacher_id = _teacher_identity(cfg.teacher, qc)
    dev = torch.device(run.device)
    with TuneState.open(state_dir(out), restart=run.restart) as state:
        state.begin(_fingerprint(checkpoint, cfg, windows, teacher_id, dev, run.version), 0)
        cache = _teacher_cache(cfg, full, windows, teacher_id, state.teacher_dir, dev, run)
        model = load_checkpoint(checkpoint, device=dev)
        attached = attach(model, parts, explicit=cfg.train is not None)
        schedule = Schedule(
            cfg.steps(windows.shape[0]), cfg.batch_size, cfg.warmup, dict(cfg.lr),
            cfg.save_every, cfg.seed,
        )  # fmt: skip
        trained = attached.count()
        log.info("training %s", ", ".join(f"{k} ({v:,} values)" for k, v in trained.items()))
        try:
            with torch.enable_grad():
                result = train(model, windows, cache, attached, schedule, state, run.progress)
        except KeyboardInterrupt:
            raise RunInterrupted(state.interrupted_message()) from None
        commit(attached)
        record = _record(cfg, data, teacher_id, trained, schedule, result, cache, t0)
        record["compensator_version"] = run.version
        path = write_checkpoint_dir(
            model.cpu(), {**qc, "finetune": record}, out, tokenizer=tokenizer, force=run.force
        )
        state.discard()
    log.info("fine-tuned %s in %.1fs: %s", checkpoint, time.perf_counter() - t0, path)
    return path


def _tokenizer(checkpoint: Path, qc: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(checkpoint))
    except (OSError, ValueError):
        base = qc.get("base_model")
        if not base:
            raise CompensatorError(
                f"{checkpoint} holds no tokenizer and records no base model"
            ) from None
        return load_model(base).tokenizer


def _teacher_identity(teacher: str | None, qc: dict[str, Any]) -> dict[str, Any]:
    if teacher is not None:
        return {"model": str(teacher), "fingerprint": source_fingerprint(str(teacher))}
    base = qc.get("base_model")
    if not base:
        raise CompensatorError(
            "the checkpoint records no base model to distil from: pass --teacher MODEL"
        )
    return {"model": base, "fingerprint": qc.get("base_model_fingerprint")}


def _load_teacher(teacher_id: dict[str, Any], explicit: bool) -> nn.Module:
    if explicit:
        return load_model(teacher_id["model"]).model
    try:
        return recorded_base(teacher_id["model"], teacher_id["fingerprint"])
    except CompensatorError as err:
        # recorded_base's advice is eval's (--fp); here the way out is --teacher.
        why = str(err).split("; pass the FP model")[0]
        raise CompensatorError(f"{why}; name the teacher with --teacher MODEL") from None


def _fingerprint(
    checkpoint: str | Path,
    cfg: TuneConfig,
    windows: torch.Tensor,
    teacher: dict[str, Any],
    device: torch.device,
    version: str,
) -> dict[str, Any]:
    # save_every changes when state is written, not what is computed: resuming across it is fine
    config = {k: v for k, v in asdict(cfg).items() if k != "save_every"}
    files = [MANIFEST] if (Path(checkpoint) / MANIFEST).is_file() else ["config.json", WEIGHTS]
    return {
        "checkpoint": [file_sha256(Path(checkpoint) / f) for f in files],
        "config": json.loads(json.dumps(config, default=str)),
        "windows": tensor_sha256(windows),
        "teacher": teacher,
        "device": device.type,
        "compensator": version,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _teacher_cache(
    cfg: TuneConfig,
    full: dict[str, Any],
    windows: torch.Tensor,
    teacher_id: dict[str, Any],
    directory: Path,
    device: torch.device,
    run: TuneRun,
) -> TeacherCache:
    key = {
        "windows": tensor_sha256(windows), "shape": list(windows.shape), "top_k": cfg.top_k,
        "teacher": teacher_id,
    }  # fmt: skip
    cache = open_cache(directory, key)
    if cache is not None:
        log.info("teacher targets reused from %s", directory)
        return cache
    teacher = _load_teacher(teacher_id, cfg.teacher is not None).to(device).eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    ours = full.get("vocab_size") or (full.get("text_config") or {}).get("vocab_size")
    if ours is not None and vocab != ours:
        raise CompensatorError(
            f"the teacher's vocabulary has {vocab} tokens, the checkpoint's {ours}: distil "
            "from a model with the checkpoint's tokenizer"
        )
    cache = build_cache(teacher, windows, cfg.top_k, directory, key, run.progress)
    del teacher
    gc.collect()
    return cache


def _record(
    cfg: TuneConfig,
    data: dict[str, Any],
    teacher: dict[str, Any],
    trained: dict[str, int],
    schedule: Schedule,
    result: TrainLog,
    cache: TeacherCache,
    t0: float,
) -> dict[str, Any]:
    """What the checkpoint says of its fine-tuning."""
    tenth = max(1, len(result.losses) // 10)
    head, tail = result.losses[:tenth], result.losses[-tenth:]
    return {
        "method": "distillation (KL to the teacher's top-k + rest)",
        "teacher": teacher["model"],
        "data": data,
        "trained": trained,
        "steps": schedule.steps,
        "batch_size": schedule.batch_size,
        "lr": {part: schedule.rate(part) for part in trained},
        "warmup": schedule.warmup,
        "top_k": cfg.top_k,
        "teacher_top_k_mass": round(cache.coverage(), 5),
        "loss_first_tenth": round(sum(head) / max(1, len(head)), 6),
        "loss_last_tenth": round(sum(tail) / max(1, len(tail)), 6),
        "seed": cfg.seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "resumed_at_step": result.resumed_at,
    }
