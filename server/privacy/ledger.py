"""The coordinator's privacy ledger: the epsilon each site has spent, round by round.

Record level: a site is stateless between rounds in a simulation (and a SuperNode may restart),
so the accountant's state is not kept at the site. Instead each training reply says what the
site did (noise multiplier, Poisson sampling rate, steps: `common.privacy.DP_*`), and the ledger
keeps, per site, the history an accountant that lived through every step would hold, and asks
Opacus' accountant for epsilon after every round (`common.privacy.epsilon`). The history composes
everything a site trained (every model: a site in leave-one-site-out trains several), so it is the
site's whole spend in the run.

Site level: one Gaussian mechanism per aggregation round (Flower's DP wrapper), on the sites
sampled at rate `strategy.fraction`; the ledger counts those rounds over every model trained.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from chestfed.common import privacy as dp
from chestfed.common.config import ExperimentConfig

GROUP_RULE = ("group privacy for k images of one patient from (eps, delta)-DP: "
              "(k eps, k e^((k-1) eps) delta) (Dwork & Roth 2014); k = the site's largest number "
              "of training images per patient")
NORM_NOTE = ("BatchNorm replaced by GroupNorm through Opacus' ModuleValidator.fix "
             "(model.norm: group); no PreciseBN pass")


def secagg_clear_metrics() -> list[str]:
    """What a site's training reply still carries in the clear under SecAgg+ (everything else of
    the update is masked): counts and settings, not the loss (server/privacy/secagg.py)."""
    return ["num-examples", "images", "steps", "seconds", "lr",
            "dp/* (record-level DP accounting: steps, sampling rate, noise, N, k)"]


class PrivacyLedger:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.history: dict[str, list[tuple[float, float, int]]] = {}
        self.n_train: dict[str, int] = {}
        self.per_patient: dict[str, int] = {}
        self.site_rounds: list[tuple[float, float, int]] = []  # site level: (z, q, 1) per round
        self.site_models: dict[str, int] = {}

    FIELDS = ("history", "n_train", "per_patient", "site_rounds", "site_models")

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to keep counting epsilon from where it stopped."""
        return {k: getattr(self, k) for k in self.FIELDS}

    def load(self, state: Mapping[str, Any] | None) -> None:
        for k in self.FIELDS:
            if state and k in state:
                v = state[k]
                setattr(self, k, {s: [tuple(h) for h in hs] for s, hs in v.items()} if k == "history"
                        else [tuple(h) for h in v] if k == "site_rounds" else dict(v))

    @property
    def level(self) -> str:
        return self.cfg.privacy.dp.level

    # --- record level -------------------------------------------------------------------------
    def on_train(self, site: str, metrics: Mapping[str, Any], row: dict[str, Any]) -> None:
        """A site's training reply: extend its history, put its epsilon so far into the round's
        row (metrics.jsonl, W&B)."""
        if self.level != "record" or dp.DP_STEPS not in metrics:
            return
        self.history.setdefault(site, []).append(
            (float(metrics[dp.DP_NOISE]), float(metrics[dp.DP_SAMPLE_RATE]), int(metrics[dp.DP_STEPS])))
        self.n_train[site] = int(metrics[dp.DP_N])
        self.per_patient[site] = int(metrics.get(dp.DP_MAX_PER_PATIENT, 1))
        eps, delta = self.record_epsilon(site)
        row.update({"dp_epsilon": eps, "dp_delta": delta, "dp_steps": int(metrics[dp.DP_STEPS])})

    def record_epsilon(self, site: str) -> tuple[float, float]:
        delta = dp.record_delta(self.cfg.privacy.dp.delta, self.n_train.get(site, 1))
        return dp.epsilon(self.history.get(site, []), delta, self.cfg.privacy.dp.accountant), delta

    # --- site level ---------------------------------------------------------------------------
    def on_site_round(self, model: str, n_sampled: int, n_sites: int) -> dict[str, float]:
        """One noised aggregation (Flower's DP wrapper): returns epsilon so far and delta."""
        q = min(1.0, n_sampled / max(n_sites, 1))
        self.site_rounds.append((self.cfg.privacy.dp.noise_multiplier, q, 1))
        self.site_models[model] = self.site_models.get(model, 0) + 1
        eps, delta = self.site_epsilon()
        return {"dp_epsilon": eps, "dp_delta": delta}

    def site_epsilon(self) -> tuple[float, float]:
        delta = self.cfg.privacy.dp.delta or 1.0 / max(len(self.cfg.sites), 1)
        return dp.epsilon(self.site_rounds, delta, self.cfg.privacy.dp.accountant), delta

    # --- results.json -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        c = self.cfg.privacy
        out: dict[str, Any] = {"dp": {"level": self.level}, "secagg": c.secagg}
        if c.secagg:
            out["secagg_detail"] = {
                "protocol": "SecAgg+ (Flower SecAggPlusWorkflow + secaggplus_mod)",
                "masked": "each site's weight update (new - global weights), quantised",
                "sent_in_clear": secagg_clear_metrics(),
                "not_sent": ["train-loss"]}
        if self.level == "none":
            return out
        d = out["dp"]
        d.update({"noise_multiplier": c.dp.noise_multiplier, "accountant": c.dp.accountant,
                  "model_norm": NORM_NOTE})
        if self.level == "record":
            d.update({"unit": "one training image", "max_grad_norm": c.dp.max_grad_norm,
                      "sampling": "Poisson, rate batch_size / N (Opacus)",
                      "accounting": ("coordinator-side history of each site's (noise multiplier, "
                                     "sampling rate, steps) per round, composed by Opacus' accountant"),
                      "group_privacy": GROUP_RULE, "sites": {}})
            for site in self.history:
                eps, delta = self.record_epsilon(site)
                k = self.per_patient.get(site, 1)
                geps, gdelta = dp.group_bound(eps, delta, k)
                d["sites"][site] = {
                    "epsilon": _num(eps), "delta": delta, "steps": sum(s for _, _, s in self.history[site]),
                    "sample_rate": self.history[site][-1][1], "n_train": self.n_train.get(site),
                    "max_images_per_patient": k, "patient_epsilon": _num(geps),
                    "patient_delta": gdelta, "patient_bound_vacuous": gdelta >= 1.0}
        else:
            eps, delta = self.site_epsilon()
            d.update({"unit": "one site (all its images)", "mode": c.dp.mode,
                      "clipping": c.dp.clipping, "clipping_norm": c.dp.clipping_norm,
                      "sampling_rate": self.site_rounds[-1][1] if self.site_rounds else None,
                      "rounds": len(self.site_rounds), "models": dict(self.site_models),
                      "epsilon": _num(eps), "delta": delta,
                      "wrapper": _wrapper_name(c.dp.mode, c.dp.clipping),
                      "weighting": "every site weighs 1 in the mean (the noise is calibrated to it)"})
        return out


def _wrapper_name(mode: str, clipping: str) -> str:
    return (f"flwr.serverapp.strategy.DifferentialPrivacy{mode.capitalize()}Side"
            f"{clipping.capitalize()}Clipping")


def _num(x: float) -> float | str:
    """JSON has no infinity: 'inf' (no noise) is written as a string."""
    return x if math.isfinite(x) else "inf"
