"""The coordinator's side of one run: finding the sites, talking to them, keeping the record.

Strategies (server/strategies/) decide *what* to train where; the Coordinator does the
messaging and holds the run's state. Its jobs are in one file each: what a site is told
(server/federation/site_grid.py), finding the sites (server/federation/discovery.py), the per-round record
(server/federation/round_record.py: metrics.jsonl, W&B, the progress line, checkpoints) and the resume
hooks (server/run/resume_hooks.py), so every strategy is recorded the same way.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import time
from typing import Any, Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from chestfed.common import protocol as P
from chestfed.common.config import ExperimentConfig
from chestfed.common.errors import ChestFedError, site_error_line
from chestfed.common.labels import Task
from chestfed.common.models import batchnorm_keys, build_model
from chestfed.common.schedules import BestCheckpoint, Plateau
from chestfed.common.training import schedule_length, seed_everything
from chestfed.server.run.resume import RunState
from chestfed.server.federation.discovery import POOLED, Discovery
from chestfed.server.run.resume_hooks import ResumeHooks
from chestfed.server.federation.round_record import RoundObserver, RoundRecord
from chestfed.server.run.folder import RunFolder, echo
from chestfed.server.federation.site_grid import SiteGrid, site_experiment
from chestfed.server.tracking import Tracker
from chestfed.server.federation.trained import SiteFailure, Trained

log = logging.getLogger(__name__)


class Coordinator(Discovery, RoundRecord, ResumeHooks):
    """One run's messaging and state; the mixins hold discovery, the per-round record and the
    resume hooks (their files say which attributes they use)."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run: RunFolder, tracker: Tracker,
                 echo: Callable[[str], None] = echo, observer: RoundObserver | None = None):
        self.cfg, self.run, self.tracker, self.echo = cfg, run, tracker, echo
        self.observer = observer  # sees each round's rows (launch/tune.py prunes with it)
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
        from chestfed.server.privacy.ledger import PrivacyLedger

        self.privacy = PrivacyLedger(cfg)  # epsilon per site (privacy.dp; server/privacy/ledger.py)
        # `--resume` (server/run/resume.py): the state after the last completed round, if any.
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
    def config_record(self, **extra: Any) -> ConfigRecord:
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

    def send(self, message_type: str, payload: dict[str, tuple[ArrayRecord | None, ConfigRecord]],
             ) -> dict[str, Message]:
        """Send one message per site and wait; returns replies by site (errors included)."""
        msgs = []
        for site, (arrays, conf) in payload.items():
            if str(conf.get(P.SPLIT, "")) == "test" and self.cfg.eval.final_split != "test":
                # a tuning trial (eval.final_split: val) chooses settings: it never reads a test split
                raise ChestFedError(f"this run scores on {self.cfg.eval.final_split} only "
                                    "(eval.final_split); it may not ask a site for its test split")
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
                    why = "no reply" if r is None else site_error_line(r.error.reason or "an error")[:120]
                    self.echo(f"site {site} dropped out ({why})")
                self.absent.add(site)
            elif site in self.absent:
                self.absent.discard(site)
                self.echo(f"site {site} rejoined")

    def training_sites(self) -> list[str]:
        """The configured hospitals (not the simulation-only 'pooled' node)."""
        return [s.name for s in self.cfg.sites]

    def train_at(self, round_: int, model: str, jobs: dict[str, tuple[ArrayRecord, int]],
                 **extra: Any) -> dict[str, ArrayRecord]:
        """Train `arrays` for `epochs` at each named site (in parallel); weights back by site."""
        extra = {**self.lr_config(model), **extra}
        payload = {site: (arrays, self.config_record(**{P.LOCAL_EPOCHS: epochs, P.ROUND: round_,
                                                  P.MODEL: model, **extra}))
                   for site, (arrays, epochs) in jobs.items()}
        replies = self.send(MessageType.TRAIN, payload)
        missing = [s for s in jobs if s not in replies]
        for s in missing:
            self.dropouts.append({"round": round_, "site": s, "reason": "no reply"})
        good = self.record_train(round_, replies.values(), model, expected=len(jobs))
        return {self.site_of[r.metadata.src_node_id]: r.content[P.ARRAYS] for r in good}

    def eval_at(self, round_: int, model: str, jobs: dict[str, ArrayRecord], *,
                schedule: bool = True, **extra: Any) -> None:
        """Validation-split scores of `arrays` at each named site, recorded for this round.
        schedule=False: recorded (curves, best_val) without stepping the plateau schedule."""
        every = self.cfg.eval.every
        if every == 0 or round_ % every:
            return
        payload = {site: (arrays, self.config_record(**{P.SPLIT: "val", P.MODEL: model, **extra}))
                   for site, arrays in jobs.items()}
        arrays = next(iter(jobs.values())) if len({id(a) for a in jobs.values()}) == 1 else None
        self.record_eval(round_, self.send(MessageType.EVALUATE, payload).values(), model, arrays,
                         schedule=schedule)

    # --- validation-driven schedule and checkpoint (common/schedules.py) ---------------------
    def lr_config(self, model: str) -> dict[str, float]:
        """The learning rate a training message for `model` carries under train.lr_schedule
        plateau (nothing otherwise: the site computes constant / cosine rates itself)."""
        if self.cfg.train.lr_schedule != "plateau":
            return {}
        return {P.LR: self.plateaus.setdefault(model, Plateau(self.cfg.train)).lr}

    def after_validation(self, round_: int, model: str, val_loss: float,
                         arrays: ArrayRecord | None, schedule: bool = True) -> None:
        """One round's mean validation loss of `model`: steps its plateau schedule (unless
        `schedule` is False) and keeps its weights when they are the best so far
        (eval.checkpoints: best_val)."""
        if schedule and self.cfg.train.lr_schedule == "plateau":
            self.plateaus.setdefault(model, Plateau(self.cfg.train)).step(val_loss)
        if "best_val" in self.cfg.eval.checkpoints:
            self.best.setdefault(model, BestCheckpoint()).offer(round_, val_loss, arrays)

    # --- models -----------------------------------------------------------------------------
    def n_outputs(self) -> int:
        return len(self.cfg.task.task().names)

    def initial_arrays(self, local_bn: bool = False) -> ArrayRecord:
        """The seeded initial weights; local_bn (FedBN): without the BatchNorm parameters and
        buffers, which never leave a site, so the coordinator holds only the shared layers."""
        seed_everything(self.cfg.seed)
        model = build_model(self.cfg.model, self.n_outputs())
        state = model.state_dict()
        if local_bn:
            bn = batchnorm_keys(self.cfg.model, self.n_outputs())
            state = {k: v for k, v in state.items() if k not in bn}
        return ArrayRecord(state)


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
