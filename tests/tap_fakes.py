"""Just what the coordinator's tap (server/federation/tap.py) reads of a run's parts
(server/federation/federation.py), for tests that drive a Flower strategy class by hand
through configure_train / aggregate_train."""
from __future__ import annotations


class FakeRecord:
    """The round record's part the tap's aggregate step uses; keeps what it was handed."""

    def __init__(self, site_of: dict[int, str]):
        self.site_of = site_of
        self.dropouts: list[dict] = []
        self.recorded: list[tuple[int, list[str]]] = []

    def record_train(self, rnd, replies, model, expected=None):
        replies = list(replies)
        self.recorded.append((rnd, [self.site_of.get(r.metadata.src_node_id, "?") for r in replies]))
        return replies


class FakeSites:
    def __init__(self, site_of: dict[int, str]):
        self.site_of = site_of

    def note_presence(self, asked, replies):  # the console's dropout / rejoin lines
        pass


class FakeFed:
    def __init__(self, site_of: dict[int, str] | None = None):
        from chestfed.common.config import load_config
        from chestfed.server.federation.validation import ValidationSchedule

        site_of = dict(site_of or {1: "site0"})
        cfg = load_config()
        self.record, self.sites = FakeRecord(site_of), FakeSites(site_of)
        self.validation = ValidationSchedule(cfg.train, cfg.eval)  # no plateau: the sites' own rate
