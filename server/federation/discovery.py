"""Finding the sites at the start of a run: ask every node which site it is, then have each
load its data and report its split sizes (a mixin of SiteLink, site_link.py, which holds what
it finds)."""
from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from chestfed.common import protocol as P
from chestfed.common.caveats import counts_from_info, split_warnings
from chestfed.common.errors import ChestFedError, DataError, site_error_line

log = logging.getLogger(__name__)

POOLED = P.POOLED_NODE
# Strategies whose sites train independently of each other's success: a failed site's row (local)
# or stage (sequential) is marked failed and the others finish (strategy.min_sites).
SURVIVES_A_FAILED_SITE = ("local", "sequential")


class Discovery:
    """SiteLink.discover. Reads cfg, grid, registered, echo; fills node_of, site_of,
    site_info, unavailable and data_warnings (see SiteLink.__init__)."""

    def _identify(self, who: dict[str, Any], pooled: bool) -> str | None:
        """A HELLO reply -> the site's name: a SuperNode names its site; a simulated node says
        its partition, which indexes the config's site list (the pooled node comes last)."""
        if "name" in who:
            return str(who["name"])
        part = int(who.get("partition", -1))
        if 0 <= part < len(self.cfg.sites):
            return self.cfg.sites[part].name
        return POOLED if pooled and part == len(self.cfg.sites) else None

    def discover(self, timeout: float = 120.0, pooled: bool = False) -> None:
        """Ask every node which site it is; wait until every configured site has answered.

        A node that is not reachable (yet) is asked again, not fatal: a site that dropped
        shortly before the start and reconnects within `timeout` joins. With SuperNode
        authentication (`self.registered`: node id -> the site its key was registered for), a
        node that says it is another site is refused with one line and asked again later: the
        real site's own node is unaffected."""
        expected = [s.name for s in self.cfg.sites] + ([POOLED] if pooled else [])
        deadline = time.monotonic() + timeout
        asked: set[int] = set()
        retry_at: dict[int, float] = {}  # nodes to ask again (unreachable, refused)
        said: dict[int, str] = {}  # the last line printed about a node: said once

        def later(node: int, line: str, wait: float = 10.0) -> None:
            retry_at[node] = time.monotonic() + wait
            if said.get(node) != line:
                said[node] = line
                self.echo(line)

        while True:
            now = time.monotonic()
            nodes = [n for n in self.grid.get_node_ids()
                     if n not in asked and retry_at.get(n, 0.0) <= now]
            if nodes:
                # 1. who are you? (no experiment yet: the node is not known to be any site)
                hello = [Message(content=RecordDict({P.CONFIG: ConfigRecord({P.HELLO: True})}),
                                 dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
                joined = []
                wait = max(1.0, min(60.0, deadline - time.monotonic()))
                for n in nodes:  # not answered within `wait`: asked again on a later pass
                    retry_at[n] = time.monotonic() + wait
                for reply in self.grid.send_and_receive(hello, timeout=wait):
                    node = reply.metadata.src_node_id
                    bound = self.registered.get(node)
                    who = f"site '{bound}' (node {node})" if bound else f"node {node}"
                    if reply.has_error():
                        code = reply.error.code
                        if code == ErrorCode.INVALID_FAB:
                            raise ChestFedError(f"{who} refused this app bundle: its "
                                                "launch/site.py --trust pins another SHA-256 "
                                                "(deployment.json has this bundle's app_sha256)")
                        if code in (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE,
                                    ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
                            later(node, f"{who} is not reachable yet; waiting for it to "
                                        "reconnect")
                            continue
                        raise ChestFedError(f"a node failed to say which site it is: {reply.error.reason}")
                    name = self._identify(dict(reply.content[P.SITE_INFO]), pooled)
                    if bound is not None and name != bound:
                        later(node, f"refused node {node}: its key is registered for site "
                                    f"'{bound}' but it says it is site '{name}'")
                        continue
                    asked.add(node)
                    if name not in expected:
                        self.echo(f"warning: node {node} says it is site '{name}', which is not "
                                  f"a site of this experiment; it is left out")
                        continue
                    if name in self.node_of and self.node_of[name] != node:
                        raise ChestFedError(f"two nodes both say they are site '{name}'")
                    self.node_of[name], self.site_of[node] = node, name
                    joined.append(node)
                # 2. load your data and report its sizes (each told its own part of the experiment)
                msgs = [Message(content=RecordDict({P.CONFIG: self.config_record()}), dst_node_id=n,
                                message_type=MessageType.QUERY) for n in joined]
                for reply in (self.grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic()))
                              if msgs else []):
                    node = reply.metadata.src_node_id
                    if node not in self.site_of:  # an error from the SuperLink names no node
                        node = next((m.metadata.dst_node_id for m in msgs if m.metadata.message_id
                                     == reply.metadata.reply_to_message_id), node)
                    name = self.site_of.get(node, "?")
                    if reply.has_error() and reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                        asked.discard(node)
                        self.node_of.pop(name, None)
                        self.site_of.pop(node, None)
                        later(node, f"site {name} dropped out before loading its data; waiting "
                                    "for it to rejoin")
                        continue
                    if reply.has_error():
                        if self.cfg.strategy.name in SURVIVES_A_FAILED_SITE and name in expected:
                            # its training fails the same way: its row is marked failed there
                            self.unavailable[name] = site_error_line(reply.error.reason)
                            self.echo(f"warning: site {name} could not load its data: "
                                      f"{self.unavailable[name]}")
                            continue
                        raise DataError("a site failed to load its data: "
                                        f"{site_error_line(reply.error.reason)}", reply.error.reason)
                    self.site_info[name] = dict(reply.content[P.METRICS])
                    if said.pop(node, None) is not None:
                        self.echo(f"site {name} joined")
            missing = [s for s in expected if s not in self.site_info and s not in self.unavailable]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise ChestFedError(f"sites {missing} did not join within {timeout:.0f} s; "
                                    f"joined: {sorted(self.node_of) or 'none'} (simulation: "
                                    "runtime.join_timeout; deployment: --join-timeout)")
            time.sleep(0.5)
        self.data_warnings = []
        for name in expected[:len(self.cfg.sites)]:
            if name in self.unavailable:
                continue
            info = self.site_info[name]
            log.info("site %s: train %d, val %d, test %d images", name, info["n_train"],
                     info["n_val"], info["n_test"])
            self.data_warnings += split_warnings(name, counts_from_info(info),
                                                 self.cfg.eval.min_per_class)
        for line in self.data_warnings:
            self.echo(f"warning: {line}")
