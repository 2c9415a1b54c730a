"""A Grid that sends each message's weights as one Array (common/deploy/array_packing.py says why)
and gives the strategies the replies as the sites' ClientApps made them."""
from __future__ import annotations

from typing import Any, Iterable

from chestfed.common.deploy.array_packing import pack, unpack


class PackedGrid:
    def __init__(self, grid: Any):
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        messages = list(messages)
        for m in messages:  # in place: Flower sets each pushed message's id on it
            if m.has_content():
                m.content = pack(m.content)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        replies = list(self._grid.pull_messages(message_ids))
        for r in replies:
            if r.has_content():
                r.content = unpack(r.content)
        return replies

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                         ) -> list[Any]:
        raise NotImplementedError("PackedGrid sits under ShortPollGrid, which pushes and pulls")
