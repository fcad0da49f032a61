"""User-facing errors: one line that says what is wrong and how to fix it."""

import errno


class CompensatorError(Exception):
    """An error caused by the user's input; the CLI prints its message alone, no traceback,
    and exits with ``exit_code`` (2: a usage error)."""

    exit_code = 2


class WriteFailed(CompensatorError):
    """An output could not be written (disk full, no permission): a failure, exit status 1."""

    exit_code = 1


def write_failure(err: Exception, what: str | object) -> WriteFailed:
    """The one line for an OSError (or safetensors' error, which wraps one as text) while
    writing ``what``."""
    if getattr(err, "errno", None) == errno.ENOSPC or f"os error {errno.ENOSPC})" in str(err):
        return WriteFailed(f"disk full while writing {what}; free some space and run again")
    reason = getattr(err, "strerror", None) or " ".join(str(err).split())[:200]
    return WriteFailed(f"cannot write {what}: {reason}")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run whose finished blocks are kept: the message says where and how
    to resume."""
