"""Directories written whole or not at all: a hidden temporary sibling renamed into place."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from compensator.errors import CompensatorError, write_failure
from compensator.io.manifest import MANIFEST, listed_files, unlisted_entries

log = logging.getLogger(__name__)


def check_out(out: str | Path, force: bool, protect: tuple[str | Path, ...] = ()) -> None:
    """Refuse an output path that would lose data: one equal to, inside or holding a
    ``protect``-ed path (the source model or checkpoint); an existing non-empty one without
    ``force``; with it, anything but an empty folder or a folder whose every file its own
    manifest lists (an earlier output of ours), and the working directory or its parents."""
    if not str(out).strip():
        raise CompensatorError("--out is empty; name the output directory")
    out = Path(out)
    check_name_length(out)
    check_not_source(out, protect)
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
    check_replaceable(out)


# What our names add to --out's last component: ``.<name>.partial-<pid>-<ns>`` siblings.
_SIBLING_EXTRA = 40


def check_name_length(out: Path) -> None:
    """Refuse a path with a component longer than the file system allows (the last one
    with room for the hidden siblings we write beside it), which would otherwise fail half
    way with ENAMETOOLONG."""
    parts = out.absolute().parts
    for i, part in enumerate(parts[1:], start=1):
        limit = _name_max(Path(*parts[:i])) - (_SIBLING_EXTRA if i == len(parts) - 1 else 0)
        if len(part) > limit:
            raise CompensatorError(
                f"--out has a name of {len(part)} characters ({part[:24]}...); this file "
                f"system allows {limit} there: use a shorter name"
            )


def _name_max(directory: Path) -> int:
    while not directory.exists():
        directory = directory.parent
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_not_source(out: Path, protect: tuple[str | Path, ...]) -> None:
    """Refuse ``out`` equal to, inside or holding a source: writing there would replace or
    change the very files being read."""
    res = out.resolve()
    for p in protect:
        if not p or not Path(p).exists():
            continue  # a built-in name or hub id: nothing on disk to protect
        src = Path(p).resolve()
        where = "is" if res == src else "holds" if res in src.parents else "lies inside"
        if res == src or res in src.parents or src in res.parents:
            raise CompensatorError(f"--out {out} {where} the source {p}; choose a path outside it")


def check_replaceable(out: Path) -> None:
    """``--force`` replaces only what this tool wrote: a folder whose every file (and
    folder) its manifest lists. Anything else there may be the user's, so nothing is
    touched."""
    listed = listed_files(out)
    if listed is None:
        raise CompensatorError(
            f"--out {out} is not a checkpoint or export (it has no {MANIFEST}); --force "
            "replaces only those: choose another path"
        )
    unknown = unlisted_entries(out, listed)
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise CompensatorError(
            f"--out {out} holds files this tool did not write ({shown}); --force replaces "
            "only a folder whose every file its manifest lists: move them out or choose "
            "another path"
        )


def state_dir(out: str | Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state: ``<out>.partial`` beside it."""
    if not str(out).strip():
        raise CompensatorError("--out is empty; name the output directory")
    check_name_length(Path(out))
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
def atomic_file(
    out: str | Path, *, force: bool = False, protect: tuple[str | Path, ...] = ()
) -> Iterator[Path]:
    """Yield a scratch directory; the one file the block leaves in it at ``out.name``
    replaces ``out`` when the block completes. Nothing is left behind either way."""
    check_out_file(out, force, protect)
    out = Path(out).resolve()
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


def check_out_file(out: str | Path, force: bool, protect: tuple[str | Path, ...] = ()) -> None:
    """As :func:`check_out` for a one-file output: ``--force`` replaces only a file this
    tool wrote (a GGUF carrying our key, :data:`GGUF_MARK`)."""
    if not str(out).strip():
        raise CompensatorError("--out is empty; name the output file")
    out = Path(out)
    check_name_length(out)
    check_not_source(out, protect)
    if out.is_dir():
        raise CompensatorError(f"--out {out} is a directory; this format writes one file")
    if out.exists() and not force:
        raise CompensatorError(f"--out {out} exists; pass --force to replace it")
    if out.exists() and not _is_our_gguf(out):
        raise CompensatorError(
            f"--out {out} is not a GGUF this tool exported (no {GGUF_MARK} key); --force "
            "replaces only those: choose another path"
        )


# The key our GGUF exports carry, so that --force knows a file it may replace.
GGUF_MARK = "compensator.version"


def _is_our_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return False
        import gguf

        return GGUF_MARK in gguf.GGUFReader(path).fields
    except Exception:  # any file gguf cannot read is not one we can vouch for
        return False


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
