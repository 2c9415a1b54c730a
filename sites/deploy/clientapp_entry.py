"""What a deployed site's SuperExec runs as `flwr-clientapp` for every message: Flower's own
`flwr-clientapp`, with shorter retry waits for the message's objects (common/deploy/
object_pulls.py: they arrive just after the message; Flower's backoff of 1, 2, 4 s cost 6-10 s
of every message carrying weights).

launch/site.py puts a `flwr-clientapp` script that runs this file first on the SuperNode's PATH
(Flower starts its helpers by name). The app bundle's code is imported later in this process,
from the bundle: so nothing of the project is imported here, and object_pulls.py is loaded by its
path under a private name.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

OBJECT_PULLS = Path(__file__).resolve().parents[2] / "common" / "deploy" / "object_pulls.py"


def _object_pulls():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("_chestfed_object_pulls", OBJECT_PULLS)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    from flwr.supernode.cli import flwr_clientapp  # lazy: after the waits are set, as Flower's script

    _object_pulls().shorten_pull_backoff()
    sys.argv[0] = "flwr-clientapp"  # Flower's exit handler recognises its process by this name
    sys.exit(flwr_clientapp())


if __name__ == "__main__":
    main()
