"""A Grid that waits for replies at a short interval.

Flower 1.41's deployed Grid (flwr/superlink/grid/http_grid.py, `send_and_receive`) sleeps a
fixed 3 s between pulls, so every exchange with the sites ends up to 3 s after the last reply
arrived: two exchanges a round (training, then validation) and the discovery's HELLOs pay it.
`push_messages` and `pull_messages` are the Grid's public API, so this wrapper pushes, then pulls
every POLL_FIRST_S, growing to POLL_MAX_S while a round trains (one cheap loopback request to
the SuperLink each time). No Flower code is patched; the replies' objects are pulled with
shorter retry waits (common/deploy/object_pulls.py).
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from chestfed.common.deploy.object_pulls import shorten_pull_backoff

POLL_FIRST_S = 0.05
POLL_MAX_S = 0.5
POLL_GROWTH = 1.5


class ShortPollGrid:
    def __init__(self, grid: Any):
        self._grid = grid
        shorten_pull_backoff()  # a reply's objects, pulled just after it arrives

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> list[Any]:
        """As Flower's: push, then pull until every reply is in or `timeout` passed."""
        waiting = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Any] = []
        pause = POLL_FIRST_S
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(pause if end is None else max(0.0, min(pause, end - time.monotonic())))
            pause = min(POLL_MAX_S, pause * POLL_GROWTH)
        return replies
