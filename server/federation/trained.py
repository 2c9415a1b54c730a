"""The record of a model under comparison, and the error for too few answering sites."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord

from chestfed.common.errors import ChestFedError


class SiteFailure(ChestFedError):
    """Too few sites answered a round (or a site the strategy cannot do without failed)."""


@dataclass
class Trained:
    """A model under comparison: one row of the matrix."""

    name: str
    arrays: ArrayRecord
    trained_on: list[str]
    local_bn: bool = False  # FedBN: score it with each site's own BatchNorm
    meta: dict[str, Any] = field(default_factory=dict)
