"""The project's error type: anything a user can cause and fix.

Launchers catch ChestFedError, print its message on one line and exit with code 2; anything else
is a bug and keeps its traceback.
"""


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
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", reason or "")
    found = re.findall(r"Message: (.+)", text)
    if found:
        return found[-1].strip().removesuffix("'>").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"
