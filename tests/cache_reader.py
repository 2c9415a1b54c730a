"""A picklable image reader for tests/test_cache.py, in a module of its own.

Cache-building workers start fresh (spawn) and import the module that defines the reader they
are sent: this one imports numpy and sites.adapters.base only, as a real adapter's reader
module does, so a worker starts in about a second, not after importing the test module.
"""
from __future__ import annotations

import time

import numpy as np

from chestfed.sites.adapters.base import BadImageError

PICKLED = {"n": 0}


class Reader:
    """Picklable reader: image i is a 40x30 gradient plus i; listed ids are unreadable."""

    def __init__(self, bad: tuple[int, ...] = (), delay: float = 0.0):
        self.bad, self.delay = bad, delay

    def __call__(self, i: int, size: int) -> np.ndarray:
        if self.delay:
            time.sleep(self.delay)
        if i in self.bad:
            raise BadImageError(f"img{i}.png: cannot be decoded (truncated)")
        return ((np.arange(40 * 30).reshape(40, 30) + i) % 256).astype(np.uint8)

    def __getstate__(self):
        PICKLED["n"] += 1
        return self.__dict__


class DyingReader(Reader):
    """A reader whose process dies (as the kernel's OOM killer ends one) at image `at`."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def __call__(self, i: int, size: int) -> np.ndarray:
        if i == self.at:
            import os
            os._exit(9)
        return super().__call__(i, size)
