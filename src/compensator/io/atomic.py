"""Directories written whole or not at all: a hidden temporary sibling renamed into place."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from compensator.errors import CompensatorError, write_failure

log = logging.getLogger(__name__)

# What ``--force`` may replace: an output of ours (these quant methods in config.json).
REPLACEABLE = ("compensator", "compressed-tensors")


def _is_output(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
        return (config.get("quantization_config") or {}).get("quant_method") in REPLACEABLE
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: str | Path, force: bool, protect: tuple[str | Path, ...] = ()) -> None:
    """Refuse an output path that would lose data: an existing non-empty one without
    ``force``; with it, anything but an empty folder or an earlier output of ours, the
    working directory or one of its parents, and the ``protect``-ed paths (the source
    model)."""
    if not str(out).strip():
        raise CompensatorError("--out is empty; name the output directory")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompensatorError(f"--out {out} exists and is not a directory; choose another path")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not force:
        raise CompensatorError(f"--out {out} exists and is not empty; pass --force to replace it")
    res, cwd = out.resolve(), Path.cwd().resolve()
    if res == cwd or res in cwd.parents:
        raise CompensatorError(
            f"--out {out} is the working directory or one of its parents; --force will not "
            "replace it: choose a new path"
        )
    for p in protect:
        if Path(p).exists() and (res == Path(p).resolve() or res in Path(p).resolve().parents):
            raise CompensatorError(f"--out {out} holds the source model {p}; choose another path")
    if not _is_output(res):
        raise CompensatorError(
            f"--out {out} is not a checkpoint or export (no compensator or compressed-tensors "
            "config.json); --force replaces only those: choose another path"
        )


def state_dir(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state: ``<out>.partial`` beside it."""
    if not str(out).strip():
        raise CompensatorError("--out is empty; name the output directory")
    out = Path(out).resolve()
    return out.with_name(f"{out.name}.partial")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_leftovers(out: Path) -> None:
    """Remove the temporary folders that killed saves to ``out`` left behind (their
    process is gone); a live one belongs to a save still running."""
    for p in out.parent.glob(f".{out.name}.*-*-*"):
        kind, _, rest = p.name.removeprefix(f".{out.name}.").partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by a killed save", p)
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_dir(
    out: str | Path, *, force: bool = False, protect: tuple[str | Path, ...] = ()
) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block completes; on any
    error or interrupt it is removed and ``out`` is left as it was."""
    check_out(out, force, protect)
    out = Path(out).resolve()
    _make_parent(out)
    remove_leftovers(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir()
        yield tmp
        _swap_into_place(tmp, out)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(err, f"{out} (nothing was written there)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a scratch directory; the one file the block leaves in it at ``out.name``
    replaces ``out`` when the block completes. Nothing is left behind either way."""
    if not str(out).strip():
        raise CompensatorError("--out is empty; name the output file")
    out = Path(out).resolve()
    if out.is_dir():
        raise CompensatorError(f"--out {out} is a directory; this format writes one file")
    if out.exists() and not force:
        raise CompensatorError(f"--out {out} exists; pass --force to replace it")
    if out.exists() and out.open("rb").read(4) != b"GGUF":
        raise CompensatorError(f"--out {out} is not a GGUF file; --force replaces only those")
    _make_parent(out)
    remove_leftovers(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir()
        yield tmp
        (tmp / out.name).replace(out)  # same filesystem: atomic
    except (OSError, SafetensorError) as err:
        raise write_failure(err, f"{out} (nothing was written there)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe-{os.getpid()}"
        probe.mkdir()
        probe.rmdir()
    except OSError as err:
        raise CompensatorError(
            f"cannot write to {out.parent} ({err.strerror}); choose an --out in a writable "
            "directory"
        ) from None


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)  # put the previous output back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
