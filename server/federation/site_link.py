"""The coordinator's link to the sites: which node is which site, what each is told, sending a
round's messages and noticing who dropped out.

`SiteLink` is one of the parts a strategy receives (server/federation/federation.py). Finding
the sites is its mixin `Discovery` (discovery.py); what a message carries for its destination
is written by `SiteGrid` (site_grid.py), which the link sends everything through.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any, Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from chestfed.common import protocol as P
from chestfed.common.config import ExperimentConfig
from chestfed.common.errors import ChestFedError, site_error_line
from chestfed.common.training import schedule_length
from chestfed.server.federation.discovery import POOLED, Discovery
from chestfed.server.federation.site_grid import SiteGrid, site_experiment
from chestfed.server.run.folder import echo as print_line

log = logging.getLogger(__name__)


class SiteLink(Discovery):
    """Node ids and site names, the per-site part of every message, sending and presence.

    It holds the whole config because what a site is told is cut from it (`site_part`,
    site_grid.site_experiment); nothing else of the run lives here."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run_name: str,
                 echo: Callable[[str], None] = print_line, alias_salt: str | None = None):
        self.cfg, self.run_name, self.echo = cfg, run_name, echo
        self.round_timeout = cfg.strategy.round_timeout
        self.grid = SiteGrid(grid, self)  # each message tells its site only its own part
        # never sent: aliases cannot be recomputed by a site (a resumed run keeps its salt, so a
        # FedBN site finds its BatchNorm under the same alias)
        self.alias_salt = alias_salt or secrets.token_hex(16)
        self._site_parts: dict[str, dict[str, Any]] = {}
        self.model_names: dict[str, str] = {}  # alias -> model name
        self.node_of: dict[str, int] = {}
        self.site_of: dict[int, str] = {}
        self.site_info: dict[str, dict[str, float]] = {}  # site -> its split sizes and counts
        self.unavailable: dict[str, str] = {}  # local / sequential: site -> why its data failed
        self.data_warnings: list[str] = []  # small / one-class splits (common/caveats.py)
        self.absent: set[str] = set()  # sites that dropped out and have not answered since
        # node id -> the site its key was registered for (deployment: server/deploy/site_nodes.py)
        self.registered: dict[int, str] = {}

    def training_sites(self) -> list[str]:
        """The configured hospitals (not the simulation-only 'pooled' node)."""
        return [s.name for s in self.cfg.sites]

    # --- what every message carries -------------------------------------------------------------
    def config_record(self, **extra: Any) -> ConfigRecord:
        """A message's settings; `SiteGrid` adds the destination site's part of the experiment."""
        return ConfigRecord(dict(extra))

    def site_part(self, site: str) -> dict[str, Any]:
        """What every message to `site` carries (common/protocol.py): its part of the experiment,
        its name and index, the run's name (not its path), the lr schedule's length."""
        if site not in self._site_parts:
            names = self.training_sites()
            pooled = site == POOLED
            part: dict[str, Any] = {
                P.EXPERIMENT: site_experiment(self.cfg, names if pooled else [site], pooled),
                P.SITE: site, P.RUN_NAME: self.run_name,
                P.LR_ROUNDS: schedule_length(self.cfg)}
            if site in names:
                part[P.SITE_INDEX] = names.index(site)
            self._site_parts[site] = part
        return self._site_parts[site]

    def alias(self, model: str) -> str:
        """The opaque name `model` travels under (SiteGrid): the same for the whole run."""
        a = "m" + hashlib.sha256(f"{self.alias_salt}|{model}".encode()).hexdigest()[:12]
        self.model_names[a] = model
        return a

    def check_split(self, split: str) -> None:
        """A tuning trial (eval.final_split: val) chooses settings: it never reads a test split."""
        if split == "test" and self.cfg.eval.final_split != "test":
            raise ChestFedError(f"this run scores on {self.cfg.eval.final_split} only "
                                "(eval.final_split); it may not ask a site for its test split")

    # --- sending ----------------------------------------------------------------------------------
    def send(self, message_type: str, payload: dict[str, tuple[ArrayRecord | None, ConfigRecord]],
             ) -> dict[str, Message]:
        """Send one message per site and wait; returns replies by site (errors included)."""
        msgs = []
        for site, (arrays, conf) in payload.items():
            self.check_split(str(conf.get(P.SPLIT, "")))
            content = RecordDict({P.CONFIG: conf})
            if arrays is not None:
                content[P.ARRAYS] = arrays
            msgs.append(Message(content=content, dst_node_id=self.node_of[site],
                                message_type=message_type))
        return self.exchange(msgs, list(payload))

    def exchange(self, msgs: list[Message], sites: Iterable[str]) -> dict[str, Message]:
        """Send built messages (one per site of `sites`) and wait; replies by site."""
        replies = self.grid.send_and_receive(msgs, timeout=self.round_timeout)
        # A reply for a site that went away comes from the SuperLink, not the node: name it by
        # the message it answers.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        out = {}
        for r in replies:
            node = r.metadata.src_node_id
            if node not in self.site_of:
                node = sent_to.get(r.metadata.reply_to_message_id, node)
            out[self.site_of.get(node, "?")] = r
        sites = list(sites)
        for site in sites:
            if site not in out:
                log.warning("site %s did not answer within %.0f s", site, self.round_timeout)
        self.note_presence(sites, out)
        return out

    def note_presence(self, asked: Iterable[str], replies: dict[str, Message]) -> None:
        """One console line when a site drops out, and one when it answers again."""
        for site in asked:
            r = replies.get(site)
            if r is None or r.has_error():
                if site not in self.absent:
                    why = "no reply" if r is None else site_error_line(r.error.reason or "an error")[:120]
                    self.echo(f"site {site} dropped out ({why})")
                self.absent.add(site)
            elif site in self.absent:
                self.absent.discard(site)
                self.echo(f"site {site} rejoined")
