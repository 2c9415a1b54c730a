"""The final evaluation: every model under comparison scored at every site, on the same ground.

Two steps, each ONE Flower message per site (sites/scoring.py is the site's side):

1. **Deployable thresholds.** Each training site gets the models it helped train and returns,
   on its *validation* split, each model's Youden-optimal threshold per label with the numbers
   of labelled positives and negatives. A model's deployable operating point per label is then
   combined across its training sites by `combine_thresholds` (the rule is below); a model
   trained at one site simply uses that site's threshold. The test sets never choose it.
2. **Scoring.** Each site gets every model (one ArrayRecord per model under `model:<name>`) with
   the deployable thresholds and the list of pairs to compare, scores them all on its *test*
   split and returns per-model metrics (AUROC with a patient-bootstrap CI, ECE, threshold
   metrics at 0.5 / deployable / oracle, the ROC curve as TPR on a fixed 51-point FPR grid) and
   per-pair statistics (DeLong, kappa, Spearman, t-test / Wilcoxon over labels). Per-image predictions never leave a site, and the
   numbers leave under the disclosure rules of common/privacy/disclosure.py (the oracle threshold rounded
   to 0.01, small confusion counts suppressed as NaN with a `suppressed:` reason).

Caveats (common/caveats.py): each cell carries its test split's class counts (`n_pos`, `n_neg`,
and per label under `labels`) and `flags` (`small_n`, `one_class_test`, `one_class_train`,
`constant_predictor`): counts and the score range come from the test site's reply, the training
data's class counts from the sites' query replies at discovery.

FedBN: a model flagged `local_bn` is scored at each site with that site's own BatchNorm (or,
at a site that never trained it, with statistics re-estimated there); the cell says which.

Threshold rule (documented in the report too): the Youden point of the model's training sites'
*pooled* validation data. Each training site counts its labelled validation positives and
negatives scoring at or above every threshold of a fixed grid (`common.metrics.THRESHOLD_GRID`,
logit-spaced); the server sums the counts and takes the grid threshold that maximises
TPR - FPR of the sums, which is the threshold one would choose on the union of those
validation splits (to the grid's resolution) without any score leaving a site. A model
trained at one site gets that site's own Youden point. (An earlier rule averaged the sites'
own Youden thresholds in logit space; one site whose scores sit near 1 then dragged the
operating point past every positive of the others.) With no labelled positive or no negative
in any training site's validation split the threshold is NaN, and every metric at it says why.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from flwr.app import Message, MessageType, RecordDict

from chestfed.common import caveats as C
from chestfed.common import protocol as P
from chestfed.common.privacy.disclosure import ROC_FPR_GRID
from chestfed.common.metrics import youden_on_grid
from chestfed.server.federation.site_link import SiteLink

log = logging.getLogger(__name__)

# --- wire format: mirrors sites/scoring.py (tests/test_evaluator.py checks they agree) ---------

THRESHOLD_RULE = ("Youden-optimal threshold on the pooled validation splits of the model's "
                  "training sites (each site counts positives and negatives above a fixed "
                  "logit-spaced grid of thresholds; the server sums the counts)")

OWN_SITE_RULE = ("; at a test site that trained the model, that site's own validation Youden "
                 "point instead (a hospital sets its operating point on its own data)")

BATCHNORM_NOTES = {
    "global": "the model's own (global) BatchNorm",
    "own": "the site's own BatchNorm",
    "adapted": "site never trained this model: BatchNorm statistics re-estimated on its own "
               "images, affine at initial values",
}


@dataclass
class Evaluation:
    """The outcome of the final evaluation (what build_results writes to results.json)."""

    split: str
    matrix: dict[str, dict[str, dict[str, Any]]]  # model -> test site -> cell
    pairs: dict[str, dict[str, dict[str, Any]]]  # test site -> "a|b" -> statistics
    thresholds: dict[str, dict[str, dict[str, Any]]]  # model -> label -> deployable threshold
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# --- thresholds ----------------------------------------------------------------------------------


def combine_thresholds(sources: Mapping[str, Mapping[str, Any]]) -> tuple[float, str | None]:
    """One label's deployable threshold from its training sites' validation counts.

    `sources`: site -> {"n_pos", "n_neg", "pos_above", "neg_above"} (counts at
    `THRESHOLD_GRID`). Returns (threshold, reason-if-NaN). See the module docstring.
    """
    usable = {site: s for site, s in sources.items()
              if s.get("pos_above") is not None and s.get("neg_above") is not None}
    if not usable:
        if not sources:
            return math.nan, "no training site returned a validation threshold"
        why = "; ".join(f"{site}: {s.get('reason') or 'undefined'}" for site, s in sources.items())
        return math.nan, f"undefined on every training site's validation split ({why})"
    n_pos = sum(float(s["n_pos"]) for s in usable.values())
    n_neg = sum(float(s["n_neg"]) for s in usable.values())
    if n_pos <= 0 or n_neg <= 0:
        which = "positives" if n_pos <= 0 else "negatives"
        return math.nan, f"no labelled {which} in any training site's validation split"
    pos = np.sum([np.asarray(s["pos_above"], dtype=np.float64) for s in usable.values()], axis=0)
    neg = np.sum([np.asarray(s["neg_above"], dtype=np.float64) for s in usable.values()], axis=0)
    return youden_on_grid(pos, neg, n_pos, n_neg), None


# --- messaging -----------------------------------------------------------------------------------


def eval_plan(mode: str, split: str, models: list[Any], thresholds: Mapping[str, Mapping[str, float]],
          pairs: list[tuple[str, str]], settings: Mapping[str, Any]) -> str:
    def num(v: float) -> float | None:
        return None if v is None or not math.isfinite(v) else float(v)

    return json.dumps({
        "mode": mode, "split": split,
        "models": [{"name": m.name, "local_bn": bool(m.local_bn),
                    "thresholds": {k: num(v) for k, v in thresholds.get(m.name, {}).items()}}
                   for m in models],
        "pairs": [list(p) for p in pairs],
        **{k: settings[k] for k in ("bootstrap", "seed", "ci", "roc_points")},
    })


def send_eval_jobs(link: SiteLink, mode: str, split: str, jobs: Mapping[str, list[Any]],
                   thresholds: Mapping[str, Mapping[str, Mapping[str, float]]],
                   pairs: Mapping[str, list[tuple[str, str]]], settings: Mapping[str, Any]
                   ) -> dict[str, Message]:
    """One EVALUATE message per site carrying all of that site's models; replies by site.
    `thresholds`: site -> model -> label -> the deployable threshold applied there."""
    link.check_split(split)  # a tuning trial never reads a test split
    msgs, sites = [], []
    for site, models in jobs.items():
        if site not in link.node_of:
            continue
        conf = link.config_record(**{P.SPLIT: split, P.EVAL_PLAN: eval_plan(mode, split, models,
                                                               thresholds.get(site, {}),
                                                               pairs.get(site, []), settings)})
        content = RecordDict({P.CONFIG: conf})
        for m in models:
            content[P.EVAL_MODEL_PREFIX + m.name] = m.arrays
        msgs.append(Message(content=content, dst_node_id=link.node_of[site],
                            message_type=MessageType.EVALUATE))
        sites.append(site)
    return link.exchange(msgs, sites)


def _reasons(info: Mapping[str, Any], prefix: str) -> dict[str, dict[str, str]]:
    """Site-info `reason:<prefix><name>/<path>` entries grouped by name."""
    out: dict[str, dict[str, str]] = {}
    for k, v in info.items():
        if k.startswith("reason:" + prefix):
            name, _, path = k[len("reason:" + prefix):].partition("/")
            out.setdefault(name, {})[path] = str(v)
    return out


def reply_error(reply: Message | None) -> str | None:
    if reply is None:
        return "no reply"
    if reply.has_error():
        return str(reply.error.reason)
    return None


def deployable_thresholds(link: SiteLink, models: list[Any], labels: list[str],
                          settings: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Step 1: ask each training site for its validation Youden thresholds; combine per model."""
    sites = link.training_sites()
    jobs = {s: [m for m in models if s in m.trained_on] for s in sites}
    jobs = {s: ms for s, ms in jobs.items() if ms}
    replies = send_eval_jobs(link, P.EVAL_MODE_THRESHOLDS, "val", jobs, {}, {}, settings) if jobs else {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in models:
        per_label: dict[str, dict[str, Any]] = {}
        for label in labels:
            sources: dict[str, dict[str, Any]] = {}
            for site in m.trained_on:
                if site not in jobs:
                    continue  # not a configured site (cannot be asked)
                r = replies.get(site)
                err = reply_error(r)
                if err:
                    sources[site] = {"youden": math.nan, "n_pos": 0, "n_neg": 0,
                                     "reason": f"site failed: {err}"}
                    continue
                got, _ = P.split_eval_reply(dict(r.content[P.METRICS]))
                vals = got.get(m.name, {})
                why = _reasons(dict(r.content[P.SITE_INFO]), P.EVAL_MODEL_KEY).get(m.name, {})
                sources[site] = {k: float(vals.get(f"labels/{label}/{k}", math.nan))
                                 for k in ("youden", "n_pos", "n_neg")}
                for k in ("pos_above", "neg_above"):
                    if isinstance(vals.get(f"labels/{label}/{k}"), list):
                        sources[site][k] = vals[f"labels/{label}/{k}"]
                reason = why.get(f"labels/{label}/youden")
                if reason:
                    sources[site]["reason"] = reason
            t, reason = combine_thresholds(sources)
            # results.json keeps each site's own point and counts, not the grid curves
            kept = {site: {k: v for k, v in src.items() if k not in ("pos_above", "neg_above")}
                    for site, src in sources.items()}
            per_label[label] = {"threshold": t, "sources": kept}
            if reason:
                per_label[label]["reason"] = reason
        out[m.name] = per_label
    return out


def operating_points(models: list[Any], thresholds: Mapping[str, Mapping[str, Mapping[str, Any]]],
                     site: str, rule: str = "own_site",
                     ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """(model -> label -> the deployable threshold applied at test site `site`, and where each
    came from: "own site" or "pooled").

    `own_site` (default): a site that trained the model sets its operating point on its own
    validation split, as a hospital deploying a model it helped train would; any other site
    gets the training sites' pooled point (it has no say before seeing results). `pooled`: the
    pooled point everywhere. Where the site's own point is undefined (one class in its
    validation split), the pooled point is used.
    """
    out: dict[str, dict[str, float]] = {}
    source: dict[str, dict[str, str]] = {}
    for m in models:
        per, src = {}, {}
        for label, d in thresholds.get(m.name, {}).items():
            own = float((d.get("sources", {}).get(site) or {}).get("youden", math.nan))
            use_own = rule == "own_site" and site in m.trained_on and math.isfinite(own)
            per[label] = own if use_own else d["threshold"]
            src[label] = "own site" if use_own else "pooled"
        out[m.name], source[m.name] = per, src
    return out, source


# --- the whole evaluation ------------------------------------------------------------------------


def settings_of(ev: Any, seed: int) -> dict[str, Any]:
    """The evaluation's settings (results.json `evaluation`) from the config's `eval` section
    and the run's seed (the bootstrap's, unless eval.bootstrap_seed)."""
    return {"bootstrap": ev.bootstrap,
            "seed": seed if ev.bootstrap_seed is None else ev.bootstrap_seed,
            "ci": ev.ci, "roc_points": ev.roc_points, "roc_grid": len(ROC_FPR_GRID), "pairs": ev.pairs,
            "min_per_class": ev.min_per_class,
            "deployable_threshold": ev.deployable_threshold,
            "threshold_rule": THRESHOLD_RULE + (OWN_SITE_RULE if ev.deployable_threshold == "own_site" else "")}


def model_pairs(models: list[Any], mode: str = "all") -> list[tuple[str, str]]:
    """Which pairs of models the sites compare (in the models' order)."""
    if mode == "none":
        return []
    names = [m.name for m in models]
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def cell_caveats(vals: Mapping[str, Any], labels: list[str], min_per_class: int,
                 train: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """A cell's class counts and flags from one model's reply values (`labels/<L>/n_pos`, ...).

    Returns {"n_pos", "n_neg", "flags", "labels": {label: {"n_pos", "n_neg", "flags"}}}. With one
    label the cell's n_pos / n_neg are that label's; with several, the fewest over the labels
    that have labelled images at this site (the scarcest label bounds what the macro average is
    worth), and `flags` is the union of the labels' flags. `train`: per label, the model's
    training data's (positives, negatives) (None: unknown, no `one_class_train` flag).
    """
    per: dict[str, dict[str, Any]] = {}
    for label in labels:
        n = vals.get(f"labels/{label}/n")
        if n is None:
            continue  # an older site: no counts
        pos = int(vals.get(f"labels/{label}/n_pos", 0))
        neg = int(vals.get(f"labels/{label}/n_neg", int(n) - pos))
        rng = float(vals.get(f"labels/{label}/score_range", math.nan))
        flags = C.label_flags(pos, neg, min_per_class, rng, None if train is None else train.get(label))
        per[label] = {"n_pos": pos, "n_neg": neg, "flags": flags}
    scored = [d for d in per.values() if d["n_pos"] + d["n_neg"] > 0]
    return {"n_pos": min((d["n_pos"] for d in scored), default=0),
            "n_neg": min((d["n_neg"] for d in scored), default=0),
            "flags": C.ordered(f for d in per.values() for f in d["flags"]),
            "labels": per}


def parse_site_reply(site: str, models: list[Any], labels: list[str], flat: Mapping[str, Any],
                     info: Mapping[str, Any], deployable: Mapping[str, Mapping[str, float]],
                     pairs: list[tuple[str, str]], min_per_class: int = C.DEFAULT_MIN_PER_CLASS,
                     train_counts: Mapping[str, Mapping[str, tuple[int, int]] | None] | None = None,
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """One site's scoring reply -> (matrix cells by model, pair statistics by "a|b").

    `deployable`: model -> label -> the deployable threshold this site applied (kept in each
    cell; in metric names the deployable point is `op`, e.g. `macro_op/f1`, `kappa_op`).

    `train_counts`: model -> label -> (positives, negatives) of its training data
    (`common.caveats.training_counts`), for the `one_class_train` flag."""
    per_model, per_pair = P.split_eval_reply(flat)
    model_reasons = _reasons(info, P.EVAL_MODEL_KEY)
    pair_reasons = _reasons(info, P.EVAL_PAIR_KEY)
    cells: dict[str, dict[str, Any]] = {}
    for m in models:
        vals = per_model.get(m.name, {})
        cell: dict[str, Any] = {"internal": site in m.trained_on}
        cell["metrics"] = {k: v for k, v in vals.items() if not isinstance(v, list)}
        cell["metrics"]["n_images"] = flat.get(P.NUM_EXAMPLES, math.nan)
        # ROC curves arrive as TPR on the fixed FPR grid (common/privacy/disclosure.py)
        cell["roc"] = {label: {"fpr": [float(f) for f in ROC_FPR_GRID],
                               "tpr": vals[f"labels/{label}/roc_tpr"]}
                       for label in labels if isinstance(vals.get(f"labels/{label}/roc_tpr"), list)}
        cell["reasons"] = model_reasons.get(m.name, {})
        cell["thresholds"] = dict(deployable.get(m.name, {}))
        cell.update(cell_caveats(vals, labels, min_per_class, (train_counts or {}).get(m.name)))
        bn = str(info.get(P.EVAL_BATCHNORM_INFO + m.name, "global"))
        if m.local_bn:
            cell["batchnorm"] = BATCHNORM_NOTES.get(bn, bn)
        cells[m.name] = cell
    site_pairs: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        key = f"{a}{P.EVAL_PAIR_SEP}{b}"
        entry: dict[str, Any] = {"a": a, "b": b, "labels": {}, "over_labels": {},
                                 "reasons": pair_reasons.get(key, {})}
        for path, v in per_pair.get(key, {}).items():
            head, _, rest = path.partition("/")
            if head == "labels":
                label, _, stat = rest.rpartition("/")
                entry["labels"].setdefault(label, {})[stat] = v
            elif head == "over_labels":
                entry["over_labels"][rest] = v
        site_pairs[key] = entry
    return cells, site_pairs


def evaluate(link: SiteLink, models: list[Any], labels: list[str], settings: Mapping[str, Any],
             split: str = "test") -> Evaluation:
    """Deployable thresholds from the training sites' validation splits, then every model at
    every site in one message per site. Failing sites leave an `error` in their cells.
    `settings`: settings_of(cfg.eval, cfg.seed)."""
    t0 = time.perf_counter()
    thresholds = deployable_thresholds(link, models, labels, settings)
    sites = link.training_sites()
    points = {site: operating_points(models, thresholds, site, settings["deployable_threshold"])
              for site in sites}
    deployable = {site: p[0] for site, p in points.items()}  # site -> model -> label -> threshold
    pairs = model_pairs(models, settings["pairs"])
    train_counts = {m.name: C.training_counts(link.site_info, m.trained_on, labels) for m in models}
    replies = send_eval_jobs(link, P.EVAL_MODE_SCORE, split, {s: models for s in sites}, deployable,
                    {s: pairs for s in sites}, settings)
    matrix: dict[str, dict[str, dict[str, Any]]] = {m.name: {} for m in models}
    pair_out: dict[str, dict[str, dict[str, Any]]] = {}
    for site in sites:
        r = replies.get(site)
        err = reply_error(r)
        if err:
            for m in models:
                matrix[m.name][site] = {"internal": site in m.trained_on, "error": err}
            continue
        cells, pair_out[site] = parse_site_reply(site, models, labels, dict(r.content[P.METRICS]),
                                                 dict(r.content[P.SITE_INFO]), deployable[site], pairs,
                                                 settings["min_per_class"], train_counts)
        for name, cell in cells.items():
            cell["threshold_from"] = points[site][1].get(name, {})
            matrix[name][site] = cell
    return Evaluation(split=split, matrix=matrix, pairs=pair_out, thresholds=thresholds,
                      settings=settings, seconds=time.perf_counter() - t0)
