"""The coordinator's half of the personalised methods' end: ask each site once for its personal
model (sites/personal.py), so it can be saved and scored at every site like `local-<site>`.

One QUERY message per site carries the final shared weights (FedPer / FedRep: the body, which
the site completes with its own head) and `RELEASE`; the reply carries that site's whole
personal model. wire.jsonl shows these messages as what they are: the only ones whose reply
holds a site's personal part.
"""
from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, MessageType

from chestfed.common import protocol as P
from chestfed.common.errors import site_error_line
from chestfed.server.federation.site_link import SiteLink


def release(link: SiteLink, model: str, sites: list[str], shared: ArrayRecord,
            settings: dict[str, Any]) -> tuple[dict[str, ArrayRecord], dict[str, str]]:
    """({site: its personal model}, {site: why it has none}) for the run's model `model`."""
    conf = {**settings, P.RELEASE: True, P.MODEL: model}
    payload = {s: (shared, link.config_record(**conf)) for s in sites if s in link.node_of}
    replies = link.send(MessageType.QUERY, payload)
    out, failed = {}, {}
    for site in sites:
        r = replies.get(site)
        if r is None or r.has_error():
            failed[site] = "no reply" if r is None else site_error_line(r.error.reason or "an error")
        else:
            out[site] = r.content[P.ARRAYS]
    return out, failed
