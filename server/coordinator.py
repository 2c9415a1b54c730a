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
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from common import protocol as P
from common.caveats import counts_from_info, split_warnings
from common.config import ExperimentConfig
from common.errors import ChestFedError, DataError, site_error_line
from common.labels import Task
from common.models import build_model
from common.schedules import BestCheckpoint, Plateau
from common.training import schedule_length, seed_everything
from server.checkpoint import RunState
from server.runfolder import RunFolder, echo
from server.tracking import Tracker

log = logging.getLogger(__name__)


POOLED = P.POOLED_NODE
# Strategies whose sites train independently of each other's success: a failed site's row (local)
# or stage (sequential) is marked failed and the others finish (strategy.min_sites).
SURVIVES_A_FAILED_SITE = ("local", "sequential")


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
        self.unavailable: dict[str, str] = {}  # local / sequential: site -> why its data failed
        self.data_warnings: list[str] = []  # small / one-class splits (common/caveats.py)
        self.images_processed = 0
        self.optimizer_steps = 0
        self._round_t0 = time.perf_counter()
        self._round_rows: dict[int, dict[str, dict[str, Any]]] = {}
        self.dropouts: list[dict[str, Any]] = []
        self.absent: set[str] = set()  # sites that dropped out and have not answered since
        # node id -> the site its key was registered for (deployment: server/deploy/site_nodes.py)
        self.registered: dict[int, str] = {}
        # Per trained model: train.lr_schedule plateau's state, eval.checkpoints best_val's weights.
        self.plateaus: dict[str, Plateau] = {}
        self.best: dict[str, BestCheckpoint] = {}
        # local / sequential: a model (row) or stage whose site failed, with the reason
        self.failed_models: list[dict[str, Any]] = []
        from server.privacy import PrivacyLedger

        self.privacy = PrivacyLedger(cfg)  # epsilon per site (privacy.dp; server/privacy.py)
        # `--resume` (server/checkpoint.py): the state after the last completed round, if any.
        self.state = RunState.open(run.path, cfg)
        if self.state.resumed:
            saved = self.state.data
            self._alias_salt = str(saved["alias_salt"])  # a FedBN site keys its BatchNorm by alias
            self.images_processed = int(saved["images_processed"])
            self.optimizer_steps = int(saved["optimizer_steps"])
            self.dropouts = list(saved["dropouts"])
            self.failed_models = list(saved.get("failed_models", []))
            self.privacy.load(saved.get("privacy"))  # epsilon keeps counting, never restarts
            # train.lr_schedule plateau and eval.checkpoints best_val go on where they were
            self.plateaus = {m: Plateau(cfg.train).load(st) for m, st in saved.get("plateaus", {}).items()}
            self.best = {m: BestCheckpoint().load(st) for m, st in saved.get("best", {}).items()}
            self.echo(f"resuming after {saved['position']} (rounds completed: {saved['rounds_done']})")

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
        self.note_presence(payload, out)
        return out

    def note_presence(self, asked: Iterable[str], replies: dict[str, Message]) -> None:
        """One console line when a site drops out, and one when it answers again."""
        for site in asked:
            r = replies.get(site)
            if r is None or r.has_error():
                if site not in self.absent:
                    why = "no reply" if r is None else \
                        ((r.error.reason or "").strip().splitlines() or ["an error"])[0][:120]
                    self.echo(f"site {site} dropped out ({why})")
                self.absent.add(site)
            elif site in self.absent:
                self.absent.discard(site)
                self.echo(f"site {site} rejoined")

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
                msgs = [Message(content=RecordDict({P.CONFIG: self.config()}), dst_node_id=n,
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
                                    f"joined: {sorted(self.node_of) or 'none'}")
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
        self._round_t0 = time.perf_counter()  # round 1's time starts here, not before discovery

    def training_sites(self) -> list[str]:
        """The configured hospitals (not the simulation-only 'pooled' node)."""
        return [s.name for s in self.cfg.sites]

    def train_at(self, round_: int, model: str, jobs: dict[str, tuple[ArrayRecord, int]],
                 **extra: Any) -> dict[str, ArrayRecord]:
        """Train `arrays` for `epochs` at each named site (in parallel); weights back by site."""
        extra = {**self.lr_config(model), **extra}
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
        arrays = next(iter(jobs.values())) if len({id(a) for a in jobs.values()}) == 1 else None
        self.record_eval(round_, self.send(MessageType.EVALUATE, payload).values(), model, arrays)

    # --- validation-driven schedule and checkpoint (common/schedules.py) ---------------------
    def lr_config(self, model: str) -> dict[str, float]:
        """The learning rate a training message for `model` carries under train.lr_schedule
        plateau (nothing otherwise: the site computes constant / cosine rates itself)."""
        if self.cfg.train.lr_schedule != "plateau":
            return {}
        return {P.LR: self.plateaus.setdefault(model, Plateau(self.cfg.train)).lr}

    def after_validation(self, round_: int, model: str, val_loss: float,
                         arrays: ArrayRecord | None) -> None:
        """One round's mean validation loss of `model`: steps its plateau schedule and keeps its
        weights when they are the best so far (eval.checkpoints: best_val)."""
        if self.cfg.train.lr_schedule == "plateau":
            self.plateaus.setdefault(model, Plateau(self.cfg.train)).step(val_loss)
        if "best_val" in self.cfg.eval.checkpoints:
            self.best.setdefault(model, BestCheckpoint()).offer(round_, val_loss, arrays)

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
            info = r.content.get(P.SITE_INFO)
            if info is not None and P.WORKER_NODE in info:  # simulation: the worker that trained
                row.update({"ray_node": str(info[P.WORKER_NODE]),
                            "gpu_ids": [g for g in str(info.get(P.WORKER_GPUS, "")).split(",") if g],
                            "cuda_visible_devices": str(info.get(P.WORKER_CUDA, ""))})
            self.privacy.on_train(site, m, row)
            good.append(r)
        need = min(self.cfg.strategy.min_sites, expected or len(replies))
        if (failed or (expected and len(good) < expected)) and len(good) < need:
            raise SiteFailure(f"round {round_}: only {len(good)} site(s) trained "
                              f"(failed: {', '.join(failed)}); strategy.min_sites is "
                              f"{self.cfg.strategy.min_sites}")
        return good

    def record_eval(self, round_: int, replies: Iterable[Message], model: str,
                    arrays: ArrayRecord | None = None) -> None:
        """Record each site's validation reply; `arrays` (the evaluated weights, when one model
        went to every site) go to `after_validation` with the mean validation loss."""
        losses = []
        for r in replies:
            site = self.site_of.get(r.metadata.src_node_id, "?")
            if r.has_error():
                log.warning("round %d: evaluation at site %s failed: %s", round_, site, r.error.reason)
                continue
            m = r.content[P.METRICS]
            self._row(round_, site, model).update({"val_auroc": m.get("macro_auroc", float("nan")),
                                                   "val_loss": m.get("loss", float("nan"))})
            losses.append(float(m.get("loss", float("nan"))))
        known = [v for v in losses if v == v]
        self.after_validation(round_, model, float(np.mean(known)) if known else float("nan"), arrays)

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

    # --- resume (server/checkpoint.py) -----------------------------------------------------
    def resume_of(self, unit: str) -> dict[str, Any] | None:
        """The saved state of training unit `unit` (a model being trained) if this run resumes
        it, else None."""
        return self.state.unit(unit) if self.state.resumed else None

    def restore_rng(self) -> None:
        """Put the server's RNGs back as they were after the last completed round (call where a
        resumed unit continues, after whatever re-seeding its start does)."""
        self.state.restore_rng()

    def save_state(self, unit: str, state: dict[str, Any] | None, position: str) -> None:
        """After `end_round`: record that `unit` completed a round and where it stands."""
        self.state.save(unit, state, self._counters(), position)

    def finished_model(self, name: str) -> Trained | None:
        """A model this run finished before it was interrupted (`keep_finished`), else None."""
        info = self.state.finished().get(name) if self.state.resumed else None
        if info is None:
            return None
        blob = torch.load(self.state.model_file(name), map_location="cpu", weights_only=True)
        return Trained(name, ArrayRecord(blob["model"]), list(info["trained_on"]),
                       local_bn=bool(info["local_bn"]), meta=dict(info["meta"]))

    def keep_finished(self, model: Trained, unit: str | None = None, save: bool = True) -> None:
        """Keep a model the strategy will not train again (a sequential stage, a finished
        leave-one-site-out model) for a resume; `unit`: the training unit it closes. `save`
        False: the caller's next `save_state` records it."""
        self.state.keep_model(model.name, model.arrays.to_torch_state_dict(),
                              {"trained_on": list(model.trained_on), "local_bn": model.local_bn,
                               "meta": dict(model.meta)})
        if save:
            self.state.save(unit, None, self._counters(), f"{model.name} finished",
                            count_round=False)

    def _counters(self) -> dict[str, Any]:
        return {"alias_salt": self._alias_salt, "images_processed": self.images_processed,
                "optimizer_steps": self.optimizer_steps, "dropouts": list(self.dropouts),
                "failed_models": list(self.failed_models), "privacy": self.privacy.state(),
                "plateaus": {m: p.state() for m, p in self.plateaus.items()},
                "best": {m: b.state() for m, b in self.best.items()}}

    # --- a failed site in local / sequential -------------------------------------------------
    def mark_failed(self, model: str, site: str, round_: int) -> None:
        """Record that `model` (a local row, a sequential stage) failed at `site` in round
        `round_`, with the reason the site gave (or that it did not answer)."""
        reasons = [d["reason"] for d in self.dropouts if d["site"] == site and d["round"] == round_]
        reason = site_error_line(str(reasons[-1])) if reasons else "no reply"
        self.failed_models.append({"model": model, "site": site, "round": round_, "reason": reason})
        self.echo(f"warning: {model} failed at site {site} (round {round_}): {reason}")

    def require_sites(self, strategy: str, succeeded: list[str]) -> None:
        """local / sequential after a site failed: go on (with a warning) when at least
        strategy.min_sites sites trained, else stop the run with one line."""
        failed = sorted({f["site"] for f in self.failed_models} - set(succeeded))
        if not failed:
            return
        need = min(self.cfg.strategy.min_sites, len(self.training_sites()))
        what = "; ".join(f"{f['site']} ({f['model']}, round {f['round']}): {f['reason']}"
                         for f in self.failed_models)
        if len(succeeded) < need:
            raise SiteFailure(f"{strategy}: only {len(succeeded)} site(s) trained and "
                              f"strategy.min_sites is {self.cfg.strategy.min_sites}; failed: {what}")
        self.echo(f"warning: {strategy} finished without {', '.join(failed)} "
                  f"({len(succeeded)} site(s) trained, strategy.min_sites "
                  f"{self.cfg.strategy.min_sites}); failed: {what}")

    # --- final models ------------------------------------------------------------------------
    def save_models(self, models: list[Trained]) -> dict[str, str]:
        paths = {}
        for m in models:
            p = self.run.save_checkpoint(m.name, m.arrays.to_torch_state_dict(),
                                         {"trained_on": m.trained_on, "strategy": self.cfg.strategy.name,
                                          "arch": self.cfg.model.arch, "task": self.cfg.task.task().names,
                                          "batchnorm": (m.meta.get("batchnorm") or {}).get("mode", "running")})
            paths[m.name] = str(p.relative_to(self.run.path))
        return paths


__all__ = ["Coordinator", "Trained", "SiteFailure", "Task"]
