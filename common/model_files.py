"""`model.weights`: the local file a model starts from, found without torch.

The launchers' preflight (server/run/start_files.py) and common/models.py's loader both go through
`weights_file`, so a missing file is refused with the same line in a second, before Ray or a
SuperLink starts and before a run folder exists, instead of in the coordinator after them.
"""
from __future__ import annotations

from pathlib import Path

from chestfed.common.errors import ConfigError


def weights_file(spec: str) -> Path:
    """The file `model.weights` names (relative to the working folder), or a ConfigError: every
    strategy on this config would fail the same way (launch/compare.py stops at the first)."""
    file = Path(spec).expanduser()
    if file.is_dir():
        raise ConfigError(f"model.weights: '{file}' is a folder; name the weights file in it")
    if not file.is_file():
        raise ConfigError(f"model.weights: file '{file}' not found (weights are only read "
                          "from a local file; nothing is downloaded)")
    return file
