"""Downstream tasks through lm-evaluation-harness (the optional ``lm-eval`` extra).

The loaded (quantized) model is handed to lm-eval as an object (``HFLM(pretrained=model)``), so
the packed runtime is what answers, exactly as in perplexity evaluation. Offline, tasks come
from local YAML definitions (``include_path``) over local files; online, from the harness's
own task list. Targets lm-eval 0.4.13.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from compensator.errors import CompensatorError

log = logging.getLogger(__name__)

_INSTALL = "pip install 'compensator[tasks]' (lm-eval 0.4.13)"
_NOT_METRICS = {"name", "alias", "sample_len", "samples"}


def parse_tasks(text: str | Sequence[str] | None) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` as a list of task names, empty names dropped."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [t.strip() for t in items if t.strip()]


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CompensatorError(f"--tasks needs lm-evaluation-harness: {_INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def task_manager(include_path: str | Path | None, tasks: Sequence[str] = ()) -> Any:
    """lm-eval's TaskManager over the YAML files under ``include_path``, plus the harness's own
    tasks unless the local ones name every task in ``tasks`` (indexing the harness's ~15k
    task files takes ~10 s)."""
    _, _, TaskManager = _lm_eval()
    if include_path is None:
        return TaskManager()
    if not Path(include_path).is_dir():
        raise CompensatorError(
            f"--include-path {include_path} is not a directory: pass the folder holding the "
            "task YAML files"
        )
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    if tasks and set(tasks) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=str(include_path))


def check_tasks(tasks: Sequence[str], manager: Any, limit: int | None = None) -> None:
    """Refuse, in one line and before any model is loaded, task names lm-eval does not know
    and a ``limit`` that is not a positive count."""
    if limit is not None and limit < 1:
        raise CompensatorError(f"--limit {limit} is not valid: use a positive count of documents")
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise CompensatorError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: name tasks from `lm-eval ls tasks`, "
            "or a local task YAML's `task:` with --include-path DIR"
        )


def metrics_of(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``results`` as ``{task: {metric: value}}``: ``"acc,none"`` -> ``"acc"``,
    stderr as ``"acc_stderr"``; a filter other than ``none`` stays in the name."""
    out: dict[str, dict[str, float | None]] = {}
    for task, values in results.items():
        row: dict[str, float | None] = {}
        for key, value in values.items():
            if key in _NOT_METRICS or not isinstance(value, int | float):
                continue
            metric, _, flt = key.partition(",")
            name = metric if flt in ("", "none") else f"{metric}[{flt}]"
            number = float(value)
            row[name] = number if math.isfinite(number) else None
        out[task] = row
    return out


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    manager: Any = None,
) -> dict[str, dict[str, float | None]]:
    """Every task's metrics for ``model`` (lm-eval's ``simple_evaluate``, zero-shot)."""
    lm_eval, HFLM, _ = _lm_eval()
    manager = manager or task_manager(include_path, tasks)
    check_tasks(tasks, manager, limit)
    start = time.perf_counter()
    was_training = model.training
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False
        )
    except (ConnectionError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CompensatorError(
            f"an lm-eval task could not read its data ({first}): offline, define the task over "
            "local files and pass --include-path DIR"
        ) from None
    finally:
        model.train(was_training)
    metrics = metrics_of(out["results"])
    log.info(
        "lm-eval tasks %s in %.1fs: %s", ", ".join(tasks), time.perf_counter() - start, metrics
    )
    return metrics
