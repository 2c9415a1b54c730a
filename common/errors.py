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
    (launch/compare.py stops at the first)."""
