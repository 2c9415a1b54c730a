"""What a strategy receives: the parts of one run, each with one job, and the two round
operations built from them.

    strategy, train, privacy   the config sections a strategy reads (nothing else of the config)
    sites       SiteLink: node ids, what each site is told, sending, presence (site_link.py)
    record      RoundRecord: metrics.jsonl rows, W&B, progress, counters (round_record.py)
    validation  ValidationSchedule: eval.every, plateau lr, best_val weights (validation.py)
    resume      ResumeHooks: per-unit state after each round, finished models (run/resume_hooks.py)
    models      ModelFactory: initial weights, BatchNorm keys, final checkpoints (model_factory.py)

`train_at` and `eval_at` are a round's training and validation at named sites, recorded the
same way for every strategy. `Federation.open` builds the parts for a run (and, on `--resume`,
loads their saved state); server/app.py is its only caller outside the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from flwr.app import ArrayRecord, MessageType
from flwr.serverapp import Grid

from chestfed.common import protocol as P
from chestfed.common.config import ExperimentConfig
from chestfed.common.config.schema import PrivacyConfig, StrategyConfig, TrainConfig
from chestfed.server.federation.model_factory import ModelFactory
from chestfed.server.federation.round_record import RoundObserver, RoundRecord
from chestfed.server.federation.site_link import SiteLink
from chestfed.server.federation.validation import ValidationSchedule
from chestfed.server.privacy.ledger import PrivacyLedger
from chestfed.server.run.folder import RunFolder, echo as print_line
from chestfed.server.run.resume import RunState
from chestfed.server.run.resume_hooks import ResumeHooks
from chestfed.server.tracking import Tracker


@dataclass
class Federation:
    strategy: StrategyConfig
    train: TrainConfig
    privacy: PrivacyConfig
    sites: SiteLink
    record: RoundRecord
    validation: ValidationSchedule
    resume: ResumeHooks
    models: ModelFactory

    @classmethod
    def open(cls, grid: Grid, cfg: ExperimentConfig, run: RunFolder, tracker: Tracker | None,
             echo: Callable[[str], None] = print_line,
             observer: RoundObserver | None = None) -> "Federation":
        """The parts of a run in `run`; a `--resume` (server/run/resume.py) loads their state
        after the last completed round."""
        state = RunState.open(run.path, cfg)
        saved = state.data if state.resumed else {}
        sites = SiteLink(grid, cfg, run.path.name, echo, alias_salt=saved.get("alias_salt"))
        privacy = PrivacyLedger(cfg)  # epsilon per site (privacy.dp; server/privacy/ledger.py)
        record = RoundRecord(run, tracker, privacy, sites.site_of, sites.training_sites(),
                             cfg.strategy.name, cfg.strategy.min_sites, echo, observer)
        validation = ValidationSchedule(cfg.train, cfg.eval)

        def counters() -> dict[str, Any]:  # saved with every resume state
            return {"alias_salt": sites.alias_salt, **record.state(), **validation.state(),
                    "privacy": privacy.state()}

        if state.resumed:
            record.load(saved)
            validation.load(saved)
            privacy.load(saved.get("privacy"))  # epsilon keeps counting, never restarts
            echo(f"resuming after {saved['position']} (rounds completed: {saved['rounds_done']})")
        return cls(strategy=cfg.strategy, train=cfg.train, privacy=cfg.privacy, sites=sites,
                   record=record, validation=validation, resume=ResumeHooks(state, counters),
                   models=ModelFactory(cfg.model, cfg.task.task().names, cfg.seed))

    def discover(self, timeout: float = 120.0, pooled: bool = False) -> None:
        """Find the sites (SiteLink.discover); round 1's clock starts after it."""
        self.sites.discover(timeout=timeout, pooled=pooled)
        self.record.restart_clock()

    # --- one round at named sites ---------------------------------------------------------------
    def train_at(self, round_: int, model: str, jobs: dict[str, tuple[ArrayRecord, int]],
                 **extra: Any) -> dict[str, ArrayRecord]:
        """Train `arrays` for `epochs` at each named site (in parallel); weights back by site."""
        extra = {**self.validation.lr_config(model), **extra}
        payload = {site: (arrays, self.sites.config_record(**{P.LOCAL_EPOCHS: epochs, P.ROUND: round_,
                                                             P.MODEL: model, **extra}))
                   for site, (arrays, epochs) in jobs.items()}
        replies = self.sites.send(MessageType.TRAIN, payload)
        for s in jobs:
            if s not in replies:
                self.record.dropouts.append({"round": round_, "site": s, "reason": "no reply"})
        good = self.record.record_train(round_, replies.values(), model, expected=len(jobs))
        return {self.sites.site_of[r.metadata.src_node_id]: r.content[P.ARRAYS] for r in good}

    def eval_at(self, round_: int, model: str, jobs: dict[str, ArrayRecord], *,
                schedule: bool = True, **extra: Any) -> None:
        """Validation-split scores of `arrays` at each named site, recorded for this round.
        schedule=False: recorded (curves, best_val) without stepping the plateau schedule."""
        if not self.validation.due(round_):
            return
        payload = {site: (arrays, self.sites.config_record(**{P.SPLIT: "val", P.MODEL: model, **extra}))
                   for site, arrays in jobs.items()}
        # one model at every site: best_val can keep it; different weights per site: nothing to keep
        arrays = next(iter(jobs.values())) if len({id(a) for a in jobs.values()}) == 1 else None
        loss = self.record.record_eval(round_, self.sites.send(MessageType.EVALUATE, payload).values(),
                                       model)
        self.validation.after_validation(round_, model, loss, arrays, schedule)
