"""What each site is told, and only that: the coordinator's Grid writes into every outgoing
message the part of the experiment its destination site may see, and model names travel as
opaque aliases (names like `local-<site>` would tell a site the other sites' names)."""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Protocol

import yaml
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from chestfed.common import protocol as P
from chestfed.common.config import ExperimentConfig



class SiteDirectory(Protocol):
    """What the grid needs to know of the sites (SiteLink is one, site_link.py): which site a node
    is, the part of the experiment each is told, and the aliases other sites travel under."""
    site_of: dict[int, str]
    model_names: dict[str, str]

    def alias(self, model: str) -> str: ...

    def site_part(self, site: str) -> dict[str, Any]: ...


def site_experiment(cfg: ExperimentConfig, sites: list[str], pooled: bool = False) -> str:
    """The part of the experiment a site is told (YAML): its own site entry (the pooled node,
    simulation only: the entries of the sites whose data it pools), the task, data preprocessing
    and split settings, model, training, evaluation, runtime and privacy settings. Left out:
    every other site, the coordinator's image cache and output folders, a model weights file,
    W&B, the strategy (what a site needs of it comes as message keys: round, epochs, mu, the
    schedule's length), the loader's fallback notes."""
    tree = cfg.model_dump(mode="json")
    for key in ("output_dir", "wandb", "fallbacks", "strategy", "tune"):
        tree.pop(key, None)
    tree["data"].pop("cache_dir", None)
    tree["model"].pop("weights", None)
    tree["sites"] = [s for s in tree["sites"] if s["name"] in sites]
    if pooled:  # sites/pooled.py balances by strategy.balance
        tree["strategy"] = {"name": cfg.strategy.name, "balance": cfg.strategy.balance}
    return yaml.safe_dump(tree, sort_keys=False)


class SiteGrid:
    """The coordinator's Grid: writes into each outgoing message's ConfigRecord the part of the
    experiment its destination site is told (`SiteLink.site_part`), whoever built the
    message (the link, the evaluator, or a Flower strategy that sends one RecordDict to
    every node). Model names (`local-<site>`, `loso-without-<site>`, ...) would tell a site the
    other sites' names: they travel as opaque aliases (`SiteLink.alias`), in the `model` key,
    the evaluation plan and the `model:<name>` records, and replies are translated back. The
    discovery's HELLO, and messages to a node that is no known site, go as they are."""

    _ALIAS = re.compile(r"\bm[0-9a-f]{12}\b")

    def __init__(self, grid: Grid, directory: SiteDirectory):
        self._grid, self._dir = grid, directory

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _personal(self, messages: Iterable[Message]) -> list[Message]:
        msgs = list(messages)
        alias = self._dir.alias
        for m in msgs:
            site = self._dir.site_of.get(m.metadata.dst_node_id)
            if site is None or not m.has_content() or P.CONFIG not in m.content:
                continue
            conf = dict(m.content[P.CONFIG].items())
            if P.HELLO in conf:
                continue
            if str(conf.get(P.MODEL, "")):
                conf[P.MODEL] = alias(str(conf[P.MODEL]))
            if P.EVAL_PLAN in conf:
                plan = json.loads(str(conf[P.EVAL_PLAN]))
                for spec in plan.get("models", []):
                    spec["name"] = alias(spec["name"])
                plan["pairs"] = [[alias(a), alias(b)] for a, b in plan.get("pairs", [])]
                conf[P.EVAL_PLAN] = json.dumps(plan)
            conf.update(self._dir.site_part(site))
            content = RecordDict()  # a new one: a strategy shares one RecordDict across nodes
            for key, rec in m.content.items():
                if key.startswith(P.EVAL_MODEL_PREFIX):
                    key = P.EVAL_MODEL_PREFIX + alias(key[len(P.EVAL_MODEL_PREFIX):])
                content[key] = rec
            content[P.CONFIG] = ConfigRecord(conf)
            m.content = content
        return msgs

    def _named(self, text: str) -> str:
        return self._ALIAS.sub(lambda g: self._dir.model_names.get(g.group(0), g.group(0)), text)

    def _back(self, replies: Iterable[Message]) -> list[Message]:
        """Model aliases in a reply's keys (m/<alias>/..., p/<a>|<b>/..., reason:..., model:...)
        back to the model names."""
        out = list(replies)
        for r in out:
            if r.has_error() or not r.has_content():
                continue
            content = RecordDict()
            for key, rec in r.content.items():
                if type(rec).__name__ in ("MetricRecord", "ConfigRecord", "ArrayRecord") and \
                        any(self._ALIAS.search(k) for k in rec.keys()):
                    rec = type(rec)({self._named(k): v for k, v in rec.items()})
                content[self._named(key)] = rec
            r.content = content
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self._back(self._grid.send_and_receive(self._personal(messages), timeout=timeout))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self._personal(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._back(self._grid.pull_messages(message_ids))
