"""The SuperNode a site runs (launch/site.py): Flower's own `flower-supernode`, with the
bundle pin when the hospital gave --trust (sites/deploy/fab_pin.py) and shorter idle waits.

Flower 1.41's SuperNode loop (flwr/supernode/start_client_internal.py) sleeps a fixed 3 s when
the SuperLink had no message for it, and polls its own state every 0.5 s for the ClientApp's
reply; both are private literals with no option. With the warm worker a message takes well
under a second to answer, so those waits were most of a deployed round: here, in that module
only, a 3 s wait becomes IDLE_S and a 0.5 s one REPLY_S. The substitution is checked against
the module's source first; if a Flower upgrade moved the literals the SuperNode runs unchanged
(with one log line), and tests/test_warm_worker.py fails until this file is updated. The
message's objects are pulled with shorter retry waits too (common/deploy/object_pulls.py).

    python -c "from chestfed.sites.deploy.supernode import main; main()" <flower-supernode arguments>
"""
from __future__ import annotations

import inspect
import os
import sys
import time
import types
from typing import Any

from chestfed.common.deploy.object_pulls import shorten_pull_backoff
from chestfed.sites.deploy import fab_pin

IDLE_S = 0.5  # was 3 s: one light request to the SuperLink per idle wait
REPLY_S = 0.1  # was 0.5 s: a look at the SuperNode's own state
FLOWER_WAITS = {3: IDLE_S, 0.5: REPLY_S}
EXPECTED = {"time.sleep(3)": 1, "time.sleep(0.5)": 2}  # Flower 1.41.0's source


class ShortWaits:
    """`time` for start_client_internal: the same module, with its fixed waits shortened."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(FLOWER_WAITS.get(seconds, seconds))


def waits_found(module: types.ModuleType) -> dict[str, int]:
    """How often each expected wait appears in `module`'s source."""
    src = inspect.getsource(module)
    return {lit: src.count(lit) for lit in EXPECTED}


def shorten_waits() -> bool:
    """Install ShortWaits in Flower's SuperNode loop; False (and a log line) if its waits moved."""
    import flwr.supernode.start_client_internal as loop  # lazy: flwr loads only when this runs

    if waits_found(loop) != EXPECTED or not isinstance(getattr(loop, "time", None), types.ModuleType):
        print("chestfed: this Flower's SuperNode loop is not 1.41's; its idle waits stay as they "
              "are (sites/deploy/supernode.py)", file=sys.stderr, flush=True)
        return False
    loop.time = ShortWaits()  # type: ignore[assignment]
    return True


def main() -> None:
    from flwr.supernode.cli.flower_supernode import flower_supernode  # lazy: flwr loads only when this runs

    shorten_waits()
    shorten_pull_backoff()  # the message's objects, pulled from the SuperLink
    trusted = [v for v in os.environ.get(fab_pin.TRUST_ENV, "").split(",") if v]
    if trusted:
        fab_pin.install(fab_pin.parse_trust(trusted))
    flower_supernode()
