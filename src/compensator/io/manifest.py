"""The manifest every directory output carries: each file's size and sha256.

It is how ``load`` tells a damaged checkpoint from a good one, and how ``--force`` tells a
folder this tool wrote (every file listed) from one a user keeps things in.
"""

from __future__ import annotations

import json
from pathlib import Path

from compensator.models.fingerprint import file_sha256

MANIFEST = "manifest.json"


def write_manifest(directory: Path) -> None:
    """The size and sha256 of every file under ``directory``, written last."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {
        p.relative_to(directory).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in files
    }
    (directory / MANIFEST).write_text(json.dumps({"files": entries}, indent=1))


def listed_files(directory: Path) -> set[str] | None:
    """The files ``directory``'s manifest lists, or None without a readable manifest."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(entries) if isinstance(entries, dict) else None


def unlisted_entries(directory: Path, listed: set[str]) -> list[str]:
    """What ``directory`` holds beyond its manifest: files it does not list, and folders
    (empty ones too) that hold no listed file."""
    folders = {Path(name).parents[i].as_posix() for name in listed
               for i in range(len(Path(name).parents) - 1)}  # fmt: skip
    unknown = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        known = rel in folders if p.is_dir() and not p.is_symlink() else rel in listed
        if not known and rel != MANIFEST and not _inside_any(rel, unknown):
            unknown.append(rel + ("/" if p.is_dir() else ""))
    return unknown


def _inside_any(rel: str, folders: list[str]) -> bool:
    return any(f.endswith("/") and rel.startswith(f) for f in folders)
