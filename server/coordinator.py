"""The coordinator's side of one run: finding the sites, talking to them, keeping the record.

Strategies (server/strategies/) decide *what* to train where; this class does the messaging,
per-round bookkeeping (metrics.jsonl, W&B, the progress line) and checkpoints, so every
strategy is recorded the same way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import protocol as P
from common.caveats import counts_from_info, split_warnings
from common.config import ExperimentConfig
from common.errors import ChestFedError, DataError, site_error_line
from common.labels import Task
from common.models import build_model
from common.training import schedule_length, seed_everything
from server.runfolder import RunFolder, echo
from server.tracking import Tracker

log = logging.getLogger(__name__)


POOLED = P.POOLED_NODE


def site_experiment(cfg: ExperimentConfig, sites: list[str], pooled: bool = False) -> str:
    """The part of the experiment a site is told (YAML): its own site entry (the pooled node,
    simulation only: the entries of the sites whose data it pools), the task, data preprocessing
    and split settings, model, training, evaluation, runtime and privacy settings. Left out:
    every other site, the coordinator's image cache and output folders, a model weights file,
    W&B, the strategy (what a site needs of it comes as message keys: round, epochs, mu, the
    schedule's length), the loader's fallback notes."""
    tree = cfg.model_dump(mode="json")
    for key in ("output_dir", "wandb", "fallbacks", "strategy"):
        tree.pop(key, None)
    tree["data"].pop("cache_dir", None)
    tree["model"].pop("weights", None)
    tree["sites"] = [s for s in tree["sites"] if s["name"] in sites]
    if pooled:  # sites/pooled.py balances by strategy.balance
        tree["strategy"] = {"name": cfg.strategy.name, "balance": cfg.strategy.balance}
    return yaml.safe_dump(tree, sort_keys=False)


class SiteGrid:
    """The coordinator's Grid: writes into each outgoing message's ConfigRecord the part of the
    experiment its destination site is told (`Coordinator.site_part`), whoever built the
    message (the Coordinator, the evaluator, or a Flower strategy that sends one RecordDict to
    every node). Model names (`local-<site>`, `loso-without-<site>`, ...) would tell a site the
    other sites' names: they travel as opaque aliases (`Coordinator.alias`), in the `model` key,
    the evaluation plan and the `model:<name>` records, and replies are translated back. The
    discovery's HELLO, and messages to a node that is no known site, go as they are."""

    _ALIAS = re.compile(r"\bm[0-9a-f]{12}\b")

    def __init__(self, grid: Grid, coord: "Coordinator"):
        self._grid, self._coord = grid, coord

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def _personal(self, messages: Iterable[Message]) -> list[Message]:
        msgs = list(messages)
        alias = self._coord.alias
        for m in msgs:
            site = self._coord.site_of.get(m.metadata.dst_node_id)
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
            conf.update(self._coord.site_part(site))
            content = RecordDict()  # a new one: a strategy shares one RecordDict across nodes
            for key, rec in m.content.items():
                if key.startswith(P.EVAL_MODEL_PREFIX):
                    key = P.EVAL_MODEL_PREFIX + alias(key[len(P.EVAL_MODEL_PREFIX):])
                content[key] = rec
            content[P.CONFIG] = ConfigRecord(conf)
            m.content = content
        return msgs

    def _named(self, text: str) -> str:
        return self._ALIAS.sub(lambda g: self._coord.model_names.get(g.group(0), g.group(0)), text)

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


class Coordinator:
    def __init__(self, grid: Grid, cfg: ExperimentConfig, run: RunFolder, tracker: Tracker,
                 echo: Callable[[str], None] = echo):
        self.cfg, self.run, self.tracker, self.echo = cfg, run, tracker, echo
        self.grid = SiteGrid(grid, self)  # each message tells its site only its own part
        self._site_parts: dict[str, dict[str, Any]] = {}
        self._alias_salt = secrets.token_hex(16)  # never sent: aliases cannot be recomputed
        self.model_names: dict[str, str] = {}  # alias -> model name
        self.node_of: dict[str, int] = {}
        self.site_of: dict[int, str] = {}
        self.site_info: dict[str, dict[str, float]] = {}
        self.data_warnings: list[str] = []  # small / one-class splits (common/caveats.py)
        self.images_processed = 0
        self.optimizer_steps = 0
        self._round_t0 = time.perf_counter()
        self._round_rows: dict[int, dict[str, dict[str, Any]]] = {}
        self.dropouts: list[dict[str, Any]] = []
        from server.privacy import PrivacyLedger

        self.privacy = PrivacyLedger(cfg)  # epsilon per site (privacy.dp; server/privacy.py)
        # `launch/server.py --resume`: continue after the round in checkpoints/latest.pt.
        self.resume: tuple[int, ArrayRecord] | None = self._resume_point()

    def _resume_point(self) -> tuple[int, ArrayRecord] | None:
        """(completed round, its weights) if this run folder is being resumed, else None."""
        marker = self.run.path / "resume.json"
        if not marker.is_file():
            return None
        import json

        info = json.loads(marker.read_text())
        blob = torch.load(self.run.path / "checkpoints" / "latest.pt", map_location="cpu",
                          weights_only=True)
        if int(blob["meta"]["round"]) != int(info["from_round"]):
            raise ChestFedError(f"resume.json says round {info['from_round']} but "
                                f"checkpoints/latest.pt holds round {blob['meta']['round']}")
        return int(blob["meta"]["round"]), ArrayRecord(blob["model"])

    # --- messages ---------------------------------------------------------------------------
    def config(self, **extra: Any) -> ConfigRecord:
        """A message's settings; `SiteGrid` adds the destination site's part of the experiment."""
        return ConfigRecord(dict(extra))

    def site_part(self, site: str) -> dict[str, Any]:
        """What every message to `site` carries (common/protocol.py): its part of the experiment,
        its name and index, the run's name (not its path), the lr schedule's length."""
        if site not in self._site_parts:
            names = [s.name for s in self.cfg.sites]
            pooled = site == POOLED
            part: dict[str, Any] = {
                P.EXPERIMENT: site_experiment(self.cfg, names if pooled else [site], pooled),
                P.SITE: site, P.RUN_NAME: self.run.path.name,
                P.LR_ROUNDS: schedule_length(self.cfg)}
            if site in names:
                part[P.SITE_INDEX] = names.index(site)
            self._site_parts[site] = part
        return self._site_parts[site]

    def alias(self, model: str) -> str:
        """The opaque name `model` travels under (SiteGrid): the same for the whole run."""
        a = "m" + hashlib.sha256(f"{self._alias_salt}|{model}".encode()).hexdigest()[:12]
        self.model_names[a] = model
        return a

    def _identify(self, who: dict[str, Any], pooled: bool) -> str | None:
        """A HELLO reply -> the site's name: a SuperNode names its site; a simulated node says
        its partition, which indexes the config's site list (the pooled node comes last)."""
        if "name" in who:
            return str(who["name"])
        part = int(who.get("partition", -1))
        if 0 <= part < len(self.cfg.sites):
            return self.cfg.sites[part].name
        return POOLED if pooled and part == len(self.cfg.sites) else None

    def send(self, message_type: str, payload: dict[str, tuple[ArrayRecord | None, ConfigRecord]],
             ) -> dict[str, Message]:
        """Send one message per site and wait; returns replies by site (errors included)."""
        msgs = []
        for site, (arrays, conf) in payload.items():
            content = RecordDict({P.CONFIG: conf})
            if arrays is not None:
                content[P.ARRAYS] = arrays
            msgs.append(Message(content=content, dst_node_id=self.node_of[site],
                                message_type=message_type))
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.strategy.round_timeout)
        # A reply for a site that went away comes from the SuperLink, not the node: name it by
        # the message it answers.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        out = {}
        for r in replies:
            node = r.metadata.src_node_id
            if node not in self.site_of:
                node = sent_to.get(r.metadata.reply_to_message_id, node)
            out[self.site_of.get(node, "?")] = r
        for site in payload:
            if site not in out:
                log.warning("site %s did not answer within %.0f s", site, self.cfg.strategy.round_timeout)
        return out

    def discover(self, timeout: float = 120.0, pooled: bool = False) -> None:
        """Ask every node which site it is; wait until every configured site has answered."""
        expected = [s.name for s in self.cfg.sites] + ([POOLED] if pooled else [])
        deadline = time.monotonic() + timeout
        asked: set[int] = set()
        while True:
            nodes = [n for n in self.grid.get_node_ids() if n not in asked]
            if nodes:
                # 1. who are you? (no experiment yet: the node is not known to be any site)
                hello = [Message(content=RecordDict({P.CONFIG: ConfigRecord({P.HELLO: True})}),
                                 dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
                joined = []
                for reply in self.grid.send_and_receive(hello, timeout=max(1.0, deadline - time.monotonic())):
                    node = reply.metadata.src_node_id
                    asked.add(node)
                    if reply.has_error():
                        raise ChestFedError(f"a node failed to say which site it is: {reply.error.reason}")
                    name = self._identify(dict(reply.content[P.SITE_INFO]), pooled)
                    if name not in expected:
                        self.echo(f"warning: node {node} says it is site '{name}', which is not "
                                  f"a site of this experiment; it is left out")
                        continue
                    if name in self.node_of:
                        raise ChestFedError(f"two nodes both say they are site '{name}'")
                    self.node_of[name], self.site_of[node] = node, name
                    joined.append(node)
                # 2. load your data and report its sizes (each told its own part of the experiment)
                msgs = [Message(content=RecordDict({P.CONFIG: self.config()}), dst_node_id=n,
                                message_type=MessageType.QUERY) for n in joined]
                for reply in (self.grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic()))
                              if msgs else []):
                    if reply.has_error():
                        raise DataError("a site failed to load its data: "
                                        f"{site_error_line(reply.error.reason)}", reply.error.reason)
                    name = self.site_of[reply.metadata.src_node_id]
                    self.site_info[name] = dict(reply.content[P.METRICS])
            missing = [s for s in expected if s not in self.site_info]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise ChestFedError(f"sites {missing} did not join within {timeout:.0f} s; "
                                    f"joined: {sorted(self.node_of) or 'none'}")
            time.sleep(0.5)
        self.data_warnings = []
        for name in expected[:len(self.cfg.sites)]:
            info = self.site_info[name]
            log.info("site %s: train %d, val %d, test %d images", name, info["n_train"],
                     info["n_val"], info["n_test"])
            self.data_warnings += split_warnings(name, counts_from_info(info),
                                                 self.cfg.eval.min_per_class)
        for line in self.data_warnings:
            self.echo(f"warning: {line}")
        self._round_t0 = time.perf_counter()  # round 1's time starts here, not before discovery

    def training_sites(self) -> list[str]:
        """The configured hospitals (not the simulation-only 'pooled' node)."""
        return [s.name for s in self.cfg.sites]

    def train_at(self, round_: int, model: str, jobs: dict[str, tuple[ArrayRecord, int]],
                 **extra: Any) -> dict[str, ArrayRecord]:
        """Train `arrays` for `epochs` at each named site (in parallel); weights back by site."""
        payload = {site: (arrays, self.config(**{P.LOCAL_EPOCHS: epochs, P.ROUND: round_,
                                                  P.MODEL: model, **extra}))
                   for site, (arrays, epochs) in jobs.items()}
        replies = self.send(MessageType.TRAIN, payload)
        missing = [s for s in jobs if s not in replies]
        for s in missing:
            self.dropouts.append({"round": round_, "site": s, "reason": "no reply"})
        good = self.record_train(round_, replies.values(), model, expected=len(jobs))
        return {self.site_of[r.metadata.src_node_id]: r.content[P.ARRAYS] for r in good}

    def eval_at(self, round_: int, model: str, jobs: dict[str, ArrayRecord], **extra: Any) -> None:
        """Validation-split scores of `arrays` at each named site, recorded for this round."""
        every = self.cfg.eval.every
        if every == 0 or round_ % every:
            return
        payload = {site: (arrays, self.config(**{P.SPLIT: "val", P.MODEL: model, **extra}))
                   for site, arrays in jobs.items()}
        self.record_eval(round_, self.send(MessageType.EVALUATE, payload).values(), model)

    # --- models -----------------------------------------------------------------------------
    def n_outputs(self) -> int:
        return len(self.cfg.task.task().names)

    def initial_arrays(self) -> ArrayRecord:
        seed_everything(self.cfg.seed)
        model = build_model(self.cfg.model, self.n_outputs())
        return ArrayRecord(model.state_dict())

    # --- per-round record -------------------------------------------------------------------
    def record_train(self, round_: int, replies: Iterable[Message], model: str,
                     expected: int | None = None) -> list[Message]:
        """Log each site's training reply; return the good ones. Raises if too few remain."""
        good, failed = [], []
        replies = list(replies)
        for r in replies:
            site = self.site_of.get(r.metadata.src_node_id, "?")
            if r.has_error():
                failed.append(site)
                self.dropouts.append({"round": round_, "site": site, "reason": r.error.reason})
                log.warning("round %d: site %s failed: %s", round_, site, r.error.reason)
                continue
            m = r.content[P.METRICS]
            self.images_processed += int(m["images"])
            self.optimizer_steps += int(m["steps"])
            row = self._row(round_, site, model)
            if "lr" in m:
                row["lr"] = float(m["lr"])
            row.update({"train_loss": float(m["train-loss"]), "images": int(m["images"]),
                        "steps": int(m["steps"]), "train_seconds": float(m["seconds"])})
            self.privacy.on_train(site, m, row)
            good.append(r)
        need = min(self.cfg.strategy.min_sites, expected or len(replies))
        if (failed or (expected and len(good) < expected)) and len(good) < need:
            raise SiteFailure(f"round {round_}: only {len(good)} site(s) trained "
                              f"(failed: {', '.join(failed)}); strategy.min_sites is "
                              f"{self.cfg.strategy.min_sites}")
        return good

    def record_eval(self, round_: int, replies: Iterable[Message], model: str) -> None:
        for r in replies:
            site = self.site_of.get(r.metadata.src_node_id, "?")
            if r.has_error():
                log.warning("round %d: evaluation at site %s failed: %s", round_, site, r.error.reason)
                continue
            m = r.content[P.METRICS]
            self._row(round_, site, model).update({"val_auroc": m.get("macro_auroc", float("nan")),
                                                   "val_loss": m.get("loss", float("nan"))})

    def _row(self, round_: int, site: str, model: str) -> dict[str, Any]:
        rows = self._round_rows.setdefault(round_, {})
        return rows.setdefault(f"{model}|{site}", {"round": round_, "model": model, "site": site})

    def end_round(self, round_: int, total: int, arrays: ArrayRecord | None, label: str = "",
                  trained_on: list[str] | None = None) -> None:
        """Flush the round's rows to metrics.jsonl and W&B, print one line, save a checkpoint
        (with the sites its weights were trained on, when the strategy says)."""
        rows = list(self._round_rows.pop(round_, {}).values())
        secs = time.perf_counter() - self._round_t0
        self._round_t0 = time.perf_counter()
        for row in rows:
            row["round_seconds"] = secs
        if rows:
            self.run.append_metrics(rows)
        wb: dict[str, float] = {"round": round_, "images_processed": self.images_processed}
        for row in rows:
            prefix = row["site"] if row["model"] in ("", self.cfg.strategy.name) else f"{row['model']}/{row['site']}"
            if "train_loss" in row:
                wb[f"train/{prefix}/loss"] = row["train_loss"]
            if "val_auroc" in row:
                wb[f"eval/{prefix}/auroc"] = row["val_auroc"]
            if "val_loss" in row:
                wb[f"eval/{prefix}/loss"] = row["val_loss"]
            if "dp_epsilon" in row and row["dp_epsilon"] == row["dp_epsilon"]:
                wb[f"privacy/{prefix}/epsilon"] = row["dp_epsilon"]
        self.tracker.log(wb, step=round_)
        losses = [r["train_loss"] for r in rows if "train_loss" in r]
        order = {s.name: i for i, s in enumerate(self.cfg.sites)}
        rows.sort(key=lambda r: (r["model"], order.get(r["site"], len(order))))
        aucs = ", ".join(f"{r['site']} {r['val_auroc']:.3f}" for r in rows
                         if "val_auroc" in r and r["val_auroc"] == r["val_auroc"])
        line = f"round {round_}/{total}{label}  loss {np.mean(losses):.4f}" if losses else f"round {round_}/{total}{label}"
        if aucs:
            line += f"  val AUROC: {aucs}"
        self.echo(f"{line}  ({secs:.1f} s)")
        if arrays is not None:
            meta = {"round": round_, "strategy": self.cfg.strategy.name}
            if trained_on is not None:
                meta["trained_on"] = list(trained_on)
            self.run.save_checkpoint("latest", arrays.to_torch_state_dict(), meta)

    # --- final evaluation -------------------------------------------------------------------
    def evaluate_matrix(self, models: list[Trained], split: str = "test") -> dict[str, dict[str, Any]]:
        """Score every model at every site -> matrix cells (model -> site -> cell).

        server/evaluator.py does the work: deployable thresholds from each model's training
        sites' validation splits, then ONE message per site carrying every model, so the site
        can also compute paired statistics. `server.evaluator.evaluate` returns those too.
        """
        from server.evaluator import evaluate

        return evaluate(self, models, split).matrix

    def save_models(self, models: list[Trained]) -> dict[str, str]:
        paths = {}
        for m in models:
            p = self.run.save_checkpoint(m.name, m.arrays.to_torch_state_dict(),
                                         {"trained_on": m.trained_on, "strategy": self.cfg.strategy.name,
                                          "arch": self.cfg.model.arch, "task": self.cfg.task.task().names,
                                          "batchnorm": (m.meta.get("batchnorm") or {}).get("mode", "running")})
            paths[m.name] = str(p.relative_to(self.run.path))
        return paths


def state_dict_of(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


__all__ = ["Coordinator", "Trained", "SiteFailure", "Task"]
