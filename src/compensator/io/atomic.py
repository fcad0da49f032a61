"""Directories written whole or not at all: a hidden temporary sibling renamed into place."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compensator.errors import CompensatorError


def check_out(out: str | Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompensatorError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CompensatorError(f"--out {out} exists and is not empty; pass --force to replace it")


@contextmanager
def atomic_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block completes; on any
    error or interrupt it is removed and ``out`` is left as it was."""
    out = Path(out).resolve()
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir()
        yield tmp
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a scratch directory; the one file the block leaves in it at ``out.name``
    replaces ``out`` when the block completes. Nothing is left behind either way."""
    out = Path(out).resolve()
    if out.is_dir():
        raise CompensatorError(f"--out {out} is a directory; this format writes one file")
    if out.exists() and not force:
        raise CompensatorError(f"--out {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    try:
        tmp.mkdir()
        yield tmp
        (tmp / out.name).replace(out)  # same filesystem: atomic
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
