"""The per-round record every strategy shares: each site's training and validation reply into
metrics.jsonl rows, W&B, the one progress line per round and the `latest` checkpoint (a mixin of
the Coordinator, which holds the state)."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, Message

from chestfed.common import protocol as P
from chestfed.server.federation.trained import SiteFailure

log = logging.getLogger(__name__)


# Sees every completed round: (round, rounds in all, the round's rows as in metrics.jsonl, one
# per model and site with `val_auroc` / `val_loss` where validated). Raising
# chestfed.common.errors.StopRun ends the run early with the status it names.
RoundObserver = Callable[[int, int, list[dict[str, Any]]], None]


class RoundRecord:
    """Coordinator.record_train / record_eval / end_round. Reads cfg, run, tracker, echo,
    observer, site_of, privacy; keeps images_processed, optimizer_steps, dropouts and the open rounds'
    rows (see Coordinator.__init__); validation losses go to Coordinator.after_validation."""

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
                    arrays: ArrayRecord | None = None, schedule: bool = True) -> None:
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
        self.after_validation(round_, model, float(np.mean(known)) if known else float("nan"), arrays,
                              schedule)

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
        if self.observer is not None:  # may raise (launch/tune.py: the trial is pruned)
            self.observer(round_, total, rows)
