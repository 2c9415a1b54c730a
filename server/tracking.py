"""Weights & Biases tracking, offline by default.

Keys are stable so runs compare across strategies: `train/<site>/loss`, `eval/<site>/auroc`,
`matrix/<model>/<site>/auroc`. Online only when the user asked for it (and is logged in).
A tracking failure never stops training: the run folder holds every number anyway.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from chestfed.common.config import ExperimentConfig

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, name: str, group: str | None = None):
        self.run = None
        self._step = 0
        if not cfg.wandb.enabled or cfg.wandb.mode == "disabled":
            return
        try:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb  # lazy: wandb loads only when this runs

            self._wandb = wandb
            self.run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity,
                group=group or cfg.wandb.group or cfg.experiment, name=name,
                job_type=cfg.wandb.job_type or cfg.strategy.name, mode=cfg.wandb.mode, dir=str(run_dir),
                config={"strategy": cfg.strategy.name, "seed": cfg.seed,
                        "sites": [s.name for s in cfg.sites], "experiment": cfg.experiment,
                        "config": cfg.model_dump(mode="json")},
                reinit="create_new",
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )
        except Exception as exc:  # no network, bad login, wandb bug: keep training
            log.warning("W&B tracking is off for this run: %s", exc)
            self.run = None

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.run is None:
            return
        if step is not None:
            self._step = max(self._step, step)
        try:
            self.run.log(data, step=self._step)
        except Exception as exc:
            log.warning("W&B log failed: %s", exc)

    def log_matrix(self, rows: list[list[Any]], columns: list[str], image: Path | None = None) -> None:
        if self.run is None:
            return
        try:
            payload: dict[str, Any] = {"matrix": self._wandb.Table(columns=columns, data=rows)}
            if image is not None and image.is_file():
                payload["matrix_heatmap"] = self._wandb.Image(str(image))
            self.run.log(payload, step=self._step)
        except Exception as exc:
            log.warning("W&B matrix log failed: %s", exc)

    def summary(self, data: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(data)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            try:
                self.run.finish(exit_code=exit_code)
            except Exception as exc:
                log.warning("W&B finish failed: %s", exc)
            self.run = None
