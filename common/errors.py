"""The project's error type: anything a user can cause and fix.

Launchers catch ChestFedError, print its message on one line and exit with code 2; anything else
is a bug and keeps its traceback.
"""
import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class ChestFedError(Exception):
    """A user-fixable problem; the message names the thing and says what to do."""


class ConfigError(ChestFedError):
    """A bad experiment config (unknown key, wrong type, missing file)."""


class DataError(ChestFedError):
    """A site's data cannot be loaded: every strategy on the same sites would fail the same way
    (launch/compare.py stops at the first). `detail`: the site's whole error (its traceback),
    for the run's error.log."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def site_error_line(reason: str) -> str:
    """The message of a site's exception out of the error text Flower hands back (Ray's whole
    task error: a traceback with terminal colours, ending in `... Message: <the message>`)."""
    text = _ANSI.sub("", reason or "")
    found = re.findall(r"Message: (.+)", text)
    if found:
        return found[-1].strip().removesuffix("'>").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def root_cause(exc: BaseException) -> BaseException:
    """The user's error (a ChestFedError) in an exception's cause chain, else its innermost."""
    chain, cur = [], exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return next((e for e in chain if isinstance(e, ChestFedError)), chain[-1])


def one_line(exc: BaseException) -> str:
    """What went wrong, on one clean line: the user's error (a ChestFedError anywhere in the
    cause chain: Flower wraps the ServerApp's exception in its own) or the innermost cause,
    without terminal colour codes or line breaks."""
    picked = root_cause(exc)
    text = _ANSI.sub("", str(picked))
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if not isinstance(picked, ChestFedError):
        text = f"{type(picked).__name__}: {text}" if text else type(picked).__name__
    return text[:500] + ("..." if len(text) > 500 else "")


class StopRun(Exception):
    """Raised by a round observer (server/federation/round_record.py) to end a run after a round,
    e.g. launch/tune.py pruning a trial; the run's status becomes `status`. Not a failure."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
