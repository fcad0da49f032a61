"""Text sources and token windows for calibration and perplexity evaluation.

Every source resolves to one plain string that is tokenized as a whole, then cut into windows:
consecutive, non-overlapping windows for evaluation and seeded random windows for calibration.
Calibration and evaluation default to different WikiText-2 splits (validation vs test), so no
evaluated text is ever seen during calibration.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch

from compensator.errors import CompensatorError

logger = logging.getLogger(__name__)

Purpose = Literal["eval", "calib"]

DATA_ENV = "COMPENSATOR_DATA"
EVAL_NAME = "wikitext2"
CALIB_NAME = "wikitext2-valid"
EMBEDDED_NAME = "embedded"
HF_PREFIX = "hf:"
FILE_SUFFIXES = (".txt", ".raw", ".jsonl")

# Relative to $COMPENSATOR_DATA; the layout of the shared data dir.
_NAMED_FILES: dict[str, tuple[str, ...]] = {
    EVAL_NAME: ("wikitext-2-raw", "wiki.test.raw"),
    CALIB_NAME: ("wikitext-2", "valid.txt"),
}
_MEANT_FOR: dict[str, Purpose] = {EVAL_NAME: "eval", CALIB_NAME: "calib"}

ACCEPTED_FORMS = (
    f"a .txt/.raw/.jsonl file path, '{EVAL_NAME}', '{CALIB_NAME}' (both need ${DATA_ENV}), "
    f"'{EMBEDDED_NAME}', or '{HF_PREFIX}DATASET[:CONFIG]:SPLIT'"
)

_TOO_LONG_WARNING = "Token indices sequence length is longer than the specified maximum"


# --------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------


def resolve_text(source: str | None, purpose: Purpose) -> tuple[str, str]:
    """Load the text of ``source``; return ``(text, description of the source used)``.

    ``None`` picks the WikiText-2 split meant for ``purpose`` when ``$COMPENSATOR_DATA`` is set,
    otherwise the embedded offline corpus.
    """
    if purpose not in ("eval", "calib"):
        raise CompensatorError(f"unknown data purpose {purpose!r}: use 'eval' or 'calib'")
    if source is None:
        source = default_source(purpose)
        logger.info("no %s data source given; using %r", purpose, source)
    elif not isinstance(source, str) or not source.strip():
        raise CompensatorError(f"data source {source!r} is not valid: use {ACCEPTED_FORMS}")
    else:
        source = source.strip()

    start = time.perf_counter()
    text, description = _load_source(source, purpose)
    if not text.strip():
        raise CompensatorError(
            f"data source {description} contains no text: use a non-empty source"
        )
    logger.info(
        "%s text: %s (%d characters, read in %.2fs)",
        purpose,
        description,
        len(text),
        time.perf_counter() - start,
    )
    return text, description


def default_source(purpose: Purpose) -> str:
    """The source used when none is given: WikiText-2 if the data dir is configured."""
    if _data_dir_value() is None:
        return EMBEDDED_NAME
    return EVAL_NAME if purpose == "eval" else CALIB_NAME


def _load_source(source: str, purpose: Purpose) -> tuple[str, str]:
    if source in _NAMED_FILES:
        return _load_named(source, purpose)
    if source == EMBEDDED_NAME:
        return embedded_text(), "embedded pydoc corpus"
    if source.startswith(HF_PREFIX):
        return _load_hf(source)
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES:
        return read_text_file(path), f"file {path}"
    known = f"data source {source} is {_what_is(path)}, not a text file" if path.exists() else ""
    raise CompensatorError(f"{known or f'unknown data source {source!r}'}: use {ACCEPTED_FORMS}")


def _what_is(path: Path) -> str:
    return "a directory" if path.is_dir() else "a file" if path.is_file() else "a device or pipe"


def _data_dir_value() -> str | None:
    value = os.environ.get(DATA_ENV, "").strip()
    return value or None


def _load_named(name: str, purpose: Purpose) -> tuple[str, str]:
    data_dir = _data_dir_value()
    if data_dir is None:
        raise CompensatorError(
            f"data source {name!r} needs ${DATA_ENV}, which is unset: set it to the data dir "
            f"holding {'/'.join(_NAMED_FILES[name])}, or use source '{EMBEDDED_NAME}'"
        )
    path = Path(data_dir).expanduser().joinpath(*_NAMED_FILES[name])
    if not path.is_file():
        raise CompensatorError(
            f"data source {name!r}: {path} (from ${DATA_ENV}={data_dir}) does not exist: "
            f"point ${DATA_ENV} at a data dir holding {'/'.join(_NAMED_FILES[name])}"
        )
    if _MEANT_FOR[name] != purpose:
        # Allowed (the user asked for it) but it breaks the calib/eval split separation.
        logger.warning("using %r (meant for %s) as %s data", name, _MEANT_FOR[name], purpose)
    return read_text_file(path), f"{name} file {path}"


def read_text_file(path: Path) -> str:
    """Read a .txt/.raw file as UTF-8, or concatenate the "text" fields of a .jsonl file.

    Plain files are read in text mode, so CRLF line ends (wiki.test.raw has them) become "\\n",
    as with any ``open(path).read()`` elsewhere in the Python tooling we compare against.
    """
    if not path.is_file():  # a device like /dev/urandom would be read forever
        what = f"is {_what_is(path)}, not a text file" if path.exists() else "does not exist"
        raise CompensatorError(f"data file {path} {what}: check the path")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CompensatorError(
            f"data file {path} is not valid UTF-8 (byte {exc.start}): convert it to UTF-8"
        ) from exc
    except OSError as exc:
        raise CompensatorError(f"cannot read data file {path}: {exc.strerror}") from exc
    if path.suffix.lower() == ".jsonl":
        return parse_jsonl(raw, str(path))
    return raw


def parse_jsonl(raw: str, name: str) -> str:
    """Join the "text" field of every non-blank JSON line with blank lines between them."""
    texts: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CompensatorError(
                f"{name} line {lineno} is not valid JSON ({exc.msg}): one JSON object per line"
            ) from exc
        if not isinstance(record, dict) or "text" not in record:
            raise CompensatorError(
                f'{name} line {lineno} has no "text" field: every line needs {{"text": "..."}}'
            )
        if not isinstance(record["text"], str):
            raise CompensatorError(
                f'{name} line {lineno}: "text" is {type(record["text"]).__name__}, not a string'
            )
        texts.append(record["text"])
    return "\n\n".join(texts)


def embedded_text() -> str:
    """Python's own pydoc topic help: English prose that ships with every CPython install."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # stripped-down Python builds drop pydoc_data
        raise CompensatorError(
            "the embedded corpus (pydoc_data) is missing from this Python: pass a text file instead"
        ) from exc
    # Sorted keys make the corpus independent of dict order across Python builds.
    return "\n\n".join(topics[key] for key in sorted(topics))


def parse_hf_spec(source: str) -> tuple[str, str | None, str]:
    """Split ``hf:DATASET[:CONFIG]:SPLIT`` into ``(dataset, config, split)``."""
    parts = source[len(HF_PREFIX) :].split(":")
    if len(parts) not in (2, 3) or not all(part.strip() for part in parts):
        raise CompensatorError(
            f"bad Hugging Face source {source!r}: write {HF_PREFIX}DATASET[:CONFIG]:SPLIT, "
            f"e.g. {HF_PREFIX}wikitext:wikitext-2-raw-v1:test"
        )
    parts = [part.strip() for part in parts]
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _hub_offline_by_env() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable(timeout: float = 3.0) -> bool:
    # A cheap TCP probe, so an offline machine fails fast instead of hanging in retries.
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hf(source: str) -> tuple[str, str]:
    dataset, config, split = parse_hf_spec(source)
    try:
        import datasets  # type: ignore[import-not-found]  # optional, never a dependency
    except ImportError as exc:
        raise CompensatorError(
            f"source {source!r} needs the 'datasets' package, which is not installed: "
            "pip install datasets, or pass a local text file"
        ) from exc
    if _hub_offline_by_env() or not _hub_reachable():
        raise CompensatorError(
            f"source {source!r} needs the Hugging Face Hub, which is not reachable (offline): "
            "pass a local text file instead"
        )
    try:
        rows = datasets.load_dataset(dataset, config, split=split)
        column = rows["text"]
    except Exception as exc:  # any loader failure becomes one user-facing line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CompensatorError(f"cannot load {source!r}: {first_line}") from exc
    config_part = f"/{config}" if config else ""
    return "\n\n".join(column), f"Hugging Face dataset {dataset}{config_part} split {split}"


# --------------------------------------------------------------------------------------------
# Tokens and windows
# --------------------------------------------------------------------------------------------


class _DropRecords(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextmanager
def _quiet_too_long_warning() -> Iterator[None]:
    # Tokenizing a whole corpus as one string is intended; the model only ever sees windows.
    hf_logger = logging.getLogger("transformers.tokenization_utils_base")
    drop = _DropRecords(_TOO_LONG_WARNING)
    hf_logger.addFilter(drop)
    try:
        yield
    finally:
        hf_logger.removeFilter(drop)


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` as one string with the tokenizer's defaults; a 1-D LongTensor."""
    start = time.perf_counter()
    with _quiet_too_long_warning():
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    tokens = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    logger.info(
        "tokenized %d characters into %d tokens in %.2fs",
        len(text),
        tokens.numel(),
        time.perf_counter() - start,
    )
    return tokens


def _check_tokens(tokens: torch.Tensor) -> None:
    if tokens.dim() != 1:
        raise CompensatorError(
            f"token ids must be a 1-D tensor, got shape {tuple(tokens.shape)}: pass tokenize_text()"
        )


def eval_windows(
    tokens: torch.Tensor, seqlen: int = 512, windows: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping ``[n, seqlen]`` windows from the start; the tail is dropped.

    ``windows`` keeps only the first ``windows`` of them.
    """
    _check_tokens(tokens)
    if seqlen < 2:
        raise CompensatorError(f"seqlen={seqlen} is too small: a window needs at least 2 tokens")
    if windows is not None and windows < 1:
        raise CompensatorError(f"windows={windows} is not valid: use a positive count or None")
    available = tokens.numel() // seqlen
    if available == 0:
        raise CompensatorError(
            f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}: "
            "use a longer text or a smaller seqlen"
        )
    n = available if windows is None else min(windows, available)
    if windows is not None and windows > available:
        logger.warning("asked for %d eval windows but the text only has %d", windows, available)
    return tokens[: n * seqlen].reshape(n, seqlen).clone()


def calibration_offsets(n_tokens: int, n: int, seqlen: int = 512, seed: int = 0) -> list[int]:
    """Start offsets of the calibration windows, drawn like the reference protocol.

    A private CPU generator seeded with ``seed`` yields the same numbers as
    ``torch.manual_seed(seed)`` followed by global ``torch.randint`` calls, without touching the
    global RNG state.
    """
    if n < 1:
        raise CompensatorError(f"n={n} calibration windows is not valid: use a positive count")
    if seqlen < 1:
        raise CompensatorError(f"seqlen={seqlen} is not valid: use a positive window length")
    high = n_tokens - seqlen - 1
    if high < 1:
        raise CompensatorError(
            f"the text has {n_tokens} tokens, too few for calibration windows of {seqlen} "
            f"(needs at least {seqlen + 2}): use a longer text or a smaller seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, high, (1,), generator=g).item()) for _ in range(n)]


def calibration_windows(
    tokens: torch.Tensor, n: int, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """``n`` random ``[seqlen]`` windows (``[n, seqlen]``), reproducible from ``seed``."""
    _check_tokens(tokens)
    offsets = calibration_offsets(tokens.numel(), n, seqlen, seed)
    if n * seqlen > tokens.numel():  # legal, but the time buys no new data
        logger.warning(
            "%d calibration windows of %d tokens read %d tokens from a text of %d: windows "
            "overlap and repeat; at most %d windows would see each token about once",
            n, seqlen, n * seqlen, tokens.numel(), max(1, tokens.numel() // seqlen),
        )  # fmt: skip
    return torch.stack([tokens[start : start + seqlen] for start in offsets]).clone()


def load_eval_windows(
    tokenizer: Any,
    source: str | None = None,
    seqlen: int = 512,
    windows: int | None = None,
) -> torch.Tensor:
    """Resolve, tokenize and cut the evaluation text into consecutive windows."""
    text, description = resolve_text(source, "eval")
    tokens = tokenize_text(tokenizer, text)
    out = eval_windows(tokens, seqlen, windows)
    logger.info(
        "eval data: %s, %d tokens, %d windows of %d tokens",
        description,
        tokens.numel(),
        out.shape[0],
        seqlen,
    )
    return out


def load_calibration_windows(
    tokenizer: Any,
    source: str | None = None,
    n: int = 128,
    seqlen: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Resolve, tokenize and sample ``n`` seeded calibration windows."""
    text, description = resolve_text(source, "calib")
    tokens = tokenize_text(tokenizer, text)
    out = calibration_windows(tokens, n, seqlen, seed)
    logger.info(
        "calibration data: %s, %d tokens, %d windows of %d tokens (seed %d)",
        description,
        tokens.numel(),
        out.shape[0],
        seqlen,
        seed,
    )
    return out
