"""Differential privacy pieces both sides share: which settings make sense, the keys a site
reports, and the epsilon of a privacy history (Opacus' accountants). The DP-SGD training loop is
in common/privacy/dp_sgd.py; this module stays free of torch, so that checking a config (common/config/__init__.py
calls `refusal`) never loads it.

Record level (`privacy.dp.level: record`): each site trains with DP-SGD (Opacus' PrivacyEngine:
Poisson sampling of each batch at rate batch_size / N, per-image gradient clipping to
`max_grad_norm`, Gaussian noise of `noise_multiplier x max_grad_norm`). Its guarantee is per
*image* of the site's train split; a patient with k images is protected at the group-privacy
bound (`group_bound`). Site level (`privacy.dp.level: site`): Flower's DP wrappers clip each
site's update and noise the aggregate at the coordinator (server/privacy/ledger.py); the unit is a whole
site. The epsilon of either comes from a history of (noise multiplier, sampling rate, steps)
composed by Opacus' RDP (or PRV) accountant: `epsilon`.

Opacus is imported only where it is used: a run without DP never loads it.
"""
from __future__ import annotations

import math
from typing import Any, Iterable


# MetricRecord keys a site adds to its training reply under record-level DP (aggregates: the
# settings it trained with and how many steps it took, never anything about one image).
DP_STEPS = "dp/steps"
DP_SAMPLE_RATE = "dp/sample-rate"
DP_NOISE = "dp/noise-multiplier"
DP_N = "dp/n-train"  # N: the train split's images (delta defaults to 1/N)
DP_MAX_PER_PATIENT = "dp/max-images-per-patient"  # k of the group-privacy bound
UNIT_WEIGHT = "dp/unit-weight"  # site level: FedAvg weighs every site 1 (the noise assumes it)
ADAPTIVE_KEY = "chestfed.dp-adaptive"  # site level, mode client: adaptiveclipping_mod, not fixed

SITE_LEVEL_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "loso")
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedbn")  # fedbn: its shared (non-BatchNorm) layers


def refusal(cfg: Any) -> str | None:
    """The one-line reason a privacy setting makes no sense with the rest of `cfg`, or None."""
    dp, strat = cfg.privacy.dp, cfg.strategy
    bases = {strat.name} | ({strat.loso_base} if strat.name == "loso" else set())
    if dp.level != "none":
        if "norm" in cfg.model.model_fields_set and cfg.model.norm == "batch":
            return ("privacy.dp needs model.norm: group (DP-SGD cannot clip per image through "
                    "BatchNorm, and noised running statistics break it); leave model.norm unset")
        if "pooled" in bases:
            return (f"privacy.dp.level: {dp.level} does not go with pooled training (it moves "
                    "images off the sites; the guarantee is each site's for its own images)")
        if cfg.model.meta or cfg.train.task_weights != "none":
            return ("privacy.dp does not support model.meta or train.task_weights yet (the DP-SGD "
                    "loop trains on images alone with one loss weight per label); drop them")
        if bases & {"ditto", "fedrep", "mrmtl", "apfl"}:
            return (f"privacy.dp.level: {dp.level} does not go with {strat.name} yet (its second "
                    "training at each site, the personal model or the head phase, runs without "
                    "DP-SGD); use fedper, finetune or fedavg")
        if "fedbn" in bases:
            return (f"privacy.dp.level: {dp.level} does not go with fedbn: DP replaces BatchNorm "
                    "with GroupNorm, so FedBN has no local layers to keep; use fedavg")
    if dp.level == "site" and strat.name not in SITE_LEVEL_STRATEGIES:
        return (f"privacy.dp.level: site needs a strategy that aggregates site updates "
                f"({', '.join(SITE_LEVEL_STRATEGIES)}), not {strat.name}; use level: record")
    if cfg.privacy.secagg:
        if strat.name not in SECAGG_STRATEGIES:
            return (f"privacy.secagg: true works with {', '.join(SECAGG_STRATEGIES)}, not "
                    f"{strat.name} (SecAgg+ only sums the sites' updates)")
        if dp.level == "site":
            return ("privacy.secagg: true with privacy.dp.level: site is not supported (Flower's "
                    "DP wrappers need each update in the clear); use level: record")
        if strat.fraction < 1:
            return "privacy.secagg: true needs strategy.fraction: 1 (every site in every round)"
        # (a site's own part of the experiment names one site and no strategy: not checked there)
        if len(cfg.sites) < 2 and "strategy" in cfg.model_fields_set:
            return "privacy.secagg: true needs at least 2 sites"
    return None


def record_delta(configured: float | None, n_train: int) -> float:
    """delta of a site's record-level guarantee: the config's, or 1/N for its N train images."""
    return float(configured) if configured is not None else 1.0 / max(int(n_train), 1)


def epsilon(history: Iterable[tuple[float, float, int]], delta: float,
            accountant: str = "rdp") -> float:
    """epsilon at `delta` of a composition of subsampled Gaussian mechanisms, each
    (noise multiplier, sampling rate, steps), by Opacus' accountant (its own state is exactly
    this history, so a history kept by the coordinator gives the same number as an accountant
    that lived through every step). inf when any step had no noise; 0 when there were none."""
    hist = [(float(z), float(q), int(s)) for z, q, s in history if int(s) > 0]
    if not hist:
        return 0.0
    if any(z <= 0 for z, _, _ in hist):
        return math.inf
    from opacus.accountants import create_accountant  # lazy: opacus loads only when this runs

    acc = create_accountant(accountant)
    acc.history = hist
    return float(acc.get_epsilon(delta=delta))


def group_bound(eps: float, delta: float, k: int) -> tuple[float, float]:
    """(epsilon, delta) for a group of k records from an (eps, delta)-DP guarantee: the standard
    conversion (k eps, k e^{(k-1) eps} delta) (Dwork & Roth 2014, Lemma 2.2 and its delta form).
    A delta >= 1 means the bound says nothing."""
    k = max(int(k), 1)
    if not math.isfinite(eps):
        return math.inf, 1.0
    try:
        d = k * math.exp((k - 1) * eps) * delta
    except OverflowError:
        d = math.inf
    return k * eps, min(d, 1.0)


def noise_for_epsilon(target_eps: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The noise multiplier that reaches `target_eps` at `delta` after `steps` at `sample_rate`
    (Opacus' get_noise_multiplier); 0 for target inf."""
    if not math.isfinite(target_eps):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier  # lazy: opacus loads only when this runs

    return float(get_noise_multiplier(target_epsilon=target_eps, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))


def max_images_per_patient(meta: Any) -> int:
    """The largest number of images one patient has in a split (1 without patient ids)."""
    if meta is None or "patient_id" not in getattr(meta, "columns", ()) or len(meta) == 0:
        return 1
    return int(meta["patient_id"].astype(str).value_counts().max())
