"""The per-round record every strategy shares: each site's training and validation reply into
metrics.jsonl rows, W&B, the one progress line per round and the `latest` checkpoint, with the
run's counters (images, optimizer steps, dropouts, failed rows) that results.json reports."""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message

from chestfed.common import protocol as P
from chestfed.common.errors import site_error_line
from chestfed.server.federation.trained import SiteFailure
from chestfed.server.privacy.ledger import PrivacyLedger
from chestfed.server.run.folder import RunFolder
from chestfed.server.tracking import Tracker

log = logging.getLogger(__name__)


# Sees every completed round: (round, rounds in all, the round's rows as in metrics.jsonl, one
# per model and site with `val_auroc` / `val_loss` where validated). Raising
# chestfed.common.errors.StopRun ends the run early with the status it names.
RoundObserver = Callable[[int, int, list[dict[str, Any]]], None]


class RoundRecord:
    """One run's per-round rows and counters.

    `site_of` is the link's node id -> site map (SiteLink.site_of, filled at discovery);
    `sites` the configured site names in config order (the progress line's order);
    `strategy` / `min_sites`: the run's strategy name (W&B keys drop it) and how many sites a
    round needs."""

    def __init__(self, run: RunFolder, tracker: Tracker | None, privacy: PrivacyLedger,
                 site_of: Mapping[int, str], sites: list[str], strategy: str, min_sites: int,
                 echo: Callable[[str], None], observer: RoundObserver | None = None):
        self.run, self.tracker, self.privacy, self.site_of = run, tracker, privacy, site_of
        self.sites, self.strategy, self.min_sites = list(sites), strategy, min_sites
        self.echo, self.observer = echo, observer  # observer: launch/tune.py prunes with it
        self.images_processed = 0
        self.optimizer_steps = 0
        self.site_trainings = 0  # (site, round) training jobs: with client sampling, the sampled ones
        self.dropouts: list[dict[str, Any]] = []
        # local / sequential: a model (row) or stage whose site failed, with the reason
        self.failed_models: list[dict[str, Any]] = []
        self._rows: dict[int, dict[str, dict[str, Any]]] = {}
        self._t0 = time.perf_counter()

    # --- resume ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"images_processed": self.images_processed, "optimizer_steps": self.optimizer_steps,
                "site_trainings": self.site_trainings, "dropouts": list(self.dropouts),
                "failed_models": list(self.failed_models)}

    def load(self, saved: Mapping[str, Any]) -> None:
        self.images_processed = int(saved["images_processed"])
        self.optimizer_steps = int(saved["optimizer_steps"])
        self.site_trainings = int(saved.get("site_trainings", 0))
        self.dropouts = list(saved["dropouts"])
        self.failed_models = list(saved.get("failed_models", []))

    def restart_clock(self) -> None:
        """Round 1's time starts after discovery, not before."""
        self._t0 = time.perf_counter()

    def count(self, images: int, steps: int) -> None:
        """Compute spent by one training job at a site (results.json budget)."""
        self.images_processed += int(images)
        self.optimizer_steps += int(steps)
        self.site_trainings += 1

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
            self.count(int(m["images"]), int(m["steps"]))
            row = self.row(round_, site, model)
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
        need = min(self.min_sites, expected or len(replies))
        if (failed or (expected and len(good) < expected)) and len(good) < need:
            raise SiteFailure(f"round {round_}: only {len(good)} site(s) trained "
                              f"(failed: {', '.join(failed)}); strategy.min_sites is "
                              f"{self.min_sites}")
        return good

    def record_eval(self, round_: int, replies: Iterable[Message], model: str,
                    record: str = P.METRICS) -> float:
        """Record each site's validation reply; returns the mean validation loss over the sites
        that answered (NaN: none), which the validation schedule steps on. `record`: where a
        reply holds the numbers (P.VALIDATION: carried in a training reply, eval.round_validation;
        a failed training reply was logged as such already)."""
        losses = []
        for r in replies:
            site = self.site_of.get(r.metadata.src_node_id, "?")
            if r.has_error():
                if record == P.METRICS:
                    log.warning("round %d: evaluation at site %s failed: %s", round_, site,
                                r.error.reason)
                continue
            m = r.content.get(record)
            if m is None:
                continue
            self.row(round_, site, model).update({"val_auroc": m.get("macro_auroc", float("nan")),
                                                   "val_loss": m.get("loss", float("nan"))})
            losses.append(float(m.get("loss", float("nan"))))
        known = [v for v in losses if v == v]
        return float(np.mean(known)) if known else float("nan")

    def row(self, round_: int, site: str, model: str) -> dict[str, Any]:
        """The open metrics.jsonl row of `model` at `site` in round `round_` (a tap adds to it)."""
        rows = self._rows.setdefault(round_, {})
        return rows.setdefault(f"{model}|{site}", {"round": round_, "model": model, "site": site})

    def end_round(self, round_: int, total: int, arrays: ArrayRecord | None, label: str = "",
                  trained_on: list[str] | None = None, ended_at: float | None = None) -> None:
        """Flush the round's rows to metrics.jsonl and W&B, print one line, save a checkpoint
        (with the sites its weights were trained on, when the strategy says). `ended_at`: when
        the round's work ended (time.perf_counter), if that was before now (a round whose
        validation came in the next round's replies): its seconds run from the previous
        round's end to then."""
        rows = list(self._rows.pop(round_, {}).values())
        ended = time.perf_counter() if ended_at is None else ended_at
        secs = ended - self._t0
        self._t0 = ended
        for row in rows:
            row["round_seconds"] = secs
        if rows:
            self.run.append_metrics(rows)
        wb: dict[str, float] = {"round": round_, "images_processed": self.images_processed}
        for row in rows:
            prefix = row["site"] if row["model"] in ("", self.strategy) else f"{row['model']}/{row['site']}"
            if "train_loss" in row:
                wb[f"train/{prefix}/loss"] = row["train_loss"]
            if "val_auroc" in row:
                wb[f"eval/{prefix}/auroc"] = row["val_auroc"]
            if "val_loss" in row:
                wb[f"eval/{prefix}/loss"] = row["val_loss"]
            if "dp_epsilon" in row and row["dp_epsilon"] == row["dp_epsilon"]:
                wb[f"privacy/{prefix}/epsilon"] = row["dp_epsilon"]
        if self.tracker is not None:
            self.tracker.log(wb, step=round_)
        losses = [r["train_loss"] for r in rows if "train_loss" in r]
        order = {s: i for i, s in enumerate(self.sites)}
        rows.sort(key=lambda r: (r["model"], order.get(r["site"], len(order))))
        aucs = ", ".join(f"{r['site']} {r['val_auroc']:.3f}" for r in rows
                         if "val_auroc" in r and r["val_auroc"] == r["val_auroc"])
        line = f"round {round_}/{total}{label}  loss {np.mean(losses):.4f}" if losses else f"round {round_}/{total}{label}"
        if aucs:
            line += f"  val AUROC: {aucs}"
        self.echo(f"{line}  ({secs:.1f} s)")
        if arrays is not None:
            meta = {"round": round_, "strategy": self.strategy}
            if trained_on is not None:
                meta["trained_on"] = list(trained_on)
            self.run.save_checkpoint("latest", arrays.to_torch_state_dict(), meta)
        if self.observer is not None:  # may raise (launch/tune.py: the trial is pruned)
            self.observer(round_, total, rows)

    # --- a failed site in local / sequential -------------------------------------------------
    def mark_failed(self, model: str, site: str, round_: int, reason: str | None = None) -> None:
        """Record that `model` (a local row, a sequential stage, a personal model) failed at
        `site` in round `round_`, with `reason`, else the reason the site gave that round (or
        that it did not answer)."""
        reasons = [d["reason"] for d in self.dropouts if d["site"] == site and d["round"] == round_]
        if reason is None:
            reason = site_error_line(str(reasons[-1])) if reasons else "no reply"
        self.failed_models.append({"model": model, "site": site, "round": round_, "reason": reason})
        self.echo(f"warning: {model} failed at site {site} (round {round_}): {reason}")

    def require_sites(self, strategy: str, succeeded: list[str]) -> None:
        """local / sequential after a site failed: go on (with a warning) when at least
        strategy.min_sites sites trained, else stop the run with one line."""
        failed = sorted({f["site"] for f in self.failed_models} - set(succeeded))
        if not failed:
            return
        need = min(self.min_sites, len(self.sites))
        what = "; ".join(f"{f['site']} ({f['model']}, round {f['round']}): {f['reason']}"
                         for f in self.failed_models)
        if len(succeeded) < need:
            raise SiteFailure(f"{strategy}: only {len(succeeded)} site(s) trained and "
                              f"strategy.min_sites is {self.min_sites}; failed: {what}")
        self.echo(f"warning: {strategy} finished without {', '.join(failed)} "
                  f"({len(succeeded)} site(s) trained, strategy.min_sites "
                  f"{self.min_sites}); failed: {what}")
