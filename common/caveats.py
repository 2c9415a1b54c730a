"""The caveats that travel with every number: class counts and flags.

A metric computed on a handful of positives, on one class, by a model that only ever saw one
class, or by a model whose scores are all equal is not wrong, but it is not what it seems. Sites
and the coordinator both use this module so the rules are written once:

- **class counts**: per split and task label, the numbers of labelled positives and negatives
  (a site sends them in its query reply as `n_pos/<split>/<label>` and `n_neg/<split>/<label>`,
  aggregates only; labels the site does not annotate are left out);
- **warnings** (`split_warnings`): per site, split and label, when a split holds fewer than
  `eval.min_per_class` positives or negatives, one class only, or no labelled image at all.
  `launch/describe.py` and every run print them;
- **flags** (`label_flags`) on each (model, test site, label) cell of the final evaluation:

  * `small_n`: the test split has fewer than `eval.min_per_class` positives or negatives (both
    present): the number is computed but unreliable (an AUROC on one negative is 0 or 1);
  * `one_class_test`: the test split has one class only: AUROC is n/a (its reason says which);
  * `one_class_train`: the model's training data held one class (or none) for this label: for a
    model trained at one site, that site's train split; for a pooled, federated or sequential
    model, the union of its training sites' train splits (one site with one class among others
    that have both is a run-start warning, not a flag: the model did see both classes);
  * `constant_predictor`: the model's scores on the labelled test images are all equal (range
    within 1e-6; computed at the site, which sends the range, never the scores): whatever its
    AUROC (0.5 by ties), it does not rank.

A label not annotated at a test site (no labelled image) gets no flag: its n/a reason says so.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

CONSTANT_TOL = 1e-6
DEFAULT_MIN_PER_CLASS = 10
# flag -> (mark on the terminal, in tables and figures; what it means). Marks are one letter.
FLAGS: dict[str, tuple[str, str]] = {
    "small_n": ("s", "fewer than {m} positives or negatives in the test split"),
    "one_class_test": ("o", "one class only in the test split"),
    "one_class_train": ("t", "the model's training split(s) held one class only"),
    "constant_predictor": ("c", "constant predictor (every score on the test split equal)"),
}
COUNT_PREFIXES = ("n_pos/", "n_neg/")


# --- counts ----------------------------------------------------------------------------------------


def class_counts(y: Any, names: Sequence[str], annotated: Any = None) -> dict[str, tuple[int, int]]:
    """Per label (annotated ones only): (labelled positives, labelled negatives) of `y` [N, T]."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    ann = np.ones(len(names), dtype=bool) if annotated is None else np.asarray(annotated, dtype=bool)
    return {n: (int((y[:, j] == 1).sum()), int((y[:, j] == 0).sum()))
            for j, n in enumerate(names) if ann[j]}


def counts_to_info(per_split: Mapping[str, Mapping[str, tuple[int, int]]]) -> dict[str, int]:
    """{split: {label: (pos, neg)}} -> flat `n_pos/<split>/<label>` keys (a MetricRecord's)."""
    out: dict[str, int] = {}
    for split, per_label in per_split.items():
        for label, (pos, neg) in per_label.items():
            out[f"n_pos/{split}/{label}"] = int(pos)
            out[f"n_neg/{split}/{label}"] = int(neg)
    return out


def counts_from_info(info: Mapping[str, Any]) -> dict[str, dict[str, tuple[int, int]]]:
    """The inverse of `counts_to_info` ({} for a site that sent no counts)."""
    out: dict[str, dict[str, list[int]]] = {}
    for k, v in info.items():
        for i, prefix in enumerate(COUNT_PREFIXES):
            if k.startswith(prefix):
                split, _, label = k[len(prefix):].partition("/")
                out.setdefault(split, {}).setdefault(label, [0, 0])[i] = int(v)
    return {s: {label: (c[0], c[1]) for label, c in per.items()} for s, per in out.items()}


def site_entry(info: Mapping[str, Any]) -> dict[str, Any]:
    """A site's query reply as results.json keeps it: sizes as sent, counts nested as
    `class_counts: {split: {label: {"n_pos", "n_neg"}}}`."""
    out = {k: v for k, v in info.items() if not k.startswith(COUNT_PREFIXES)}
    counts = counts_from_info(info)
    if counts:
        out["class_counts"] = {s: {label: {"n_pos": p, "n_neg": n} for label, (p, n) in per.items()}
                               for s, per in counts.items()}
    return out


def training_counts(site_info: Mapping[str, Mapping[str, Any]], trained_on: Iterable[str],
                    labels: Sequence[str]) -> dict[str, tuple[int, int]] | None:
    """Per label, (positives, negatives) of the union of the training sites' train splits;
    None when no training site sent counts. A label a site does not annotate counts 0 there."""
    total = {label: [0, 0] for label in labels}
    known = False
    for site in trained_on:
        train = counts_from_info(site_info.get(site) or {}).get("train")
        if train is None:
            continue
        known = True
        for label in labels:
            pos, neg = train.get(label, (0, 0))
            total[label][0] += pos
            total[label][1] += neg
    return {label: (p, n) for label, (p, n) in total.items()} if known else None


# --- warnings ----------------------------------------------------------------------------------------


def _list(items: list[tuple[str, int, int]]) -> str:
    return ", ".join(f"{label} ({p}+/{n}-)" for label, p, n in items)


def split_warnings(site: str, per_split: Mapping[str, Mapping[str, tuple[int, int]]],
                   min_per_class: int) -> list[str]:
    """One line per (site, split, kind of problem) naming the labels and their counts."""
    out = []
    for split, per_label in per_split.items():
        empty, one, few = [], [], []
        for label, (p, n) in per_label.items():
            if p + n == 0:
                empty.append((label, p, n))
            elif p == 0 or n == 0:
                one.append((label, p, n))
            elif min(p, n) < min_per_class:
                few.append((label, p, n))
        where = f"site {site}, {split} split"
        if empty:
            out.append(f"{where}: no labelled image for {', '.join(x[0] for x in empty)}")
        if one:
            what = {"train": "a model trained here cannot learn to rank it",
                    "val": "no deployable threshold from here",
                    "test": "AUROC is n/a here"}.get(split, "")
            out.append(f"{where}: one class only for {_list(one)}" + (f": {what}" if what else ""))
        if few:
            out.append(f"{where}: fewer than {min_per_class} (eval.min_per_class) positives or "
                       f"negatives for {_list(few)}")
    return out


# --- flags -------------------------------------------------------------------------------------------


def label_flags(n_pos: int, n_neg: int, min_per_class: int, score_range: float = math.nan,
                train: tuple[int, int] | None = None) -> list[str]:
    """The flags of one (model, test site, label) cell; see the module docstring."""
    flags = []
    if n_pos + n_neg == 0:
        return flags
    if n_pos == 0 or n_neg == 0:
        flags.append("one_class_test")
    elif min(n_pos, n_neg) < min_per_class:
        flags.append("small_n")
    if train is not None and (train[0] == 0 or train[1] == 0):
        flags.append("one_class_train")
    if math.isfinite(score_range) and score_range <= CONSTANT_TOL:
        flags.append("constant_predictor")
    return flags


def ordered(flags: Iterable[str]) -> list[str]:
    """Unique flags in FLAGS order (unknown names last)."""
    got = set(flags)
    return [f for f in FLAGS if f in got] + sorted(got - set(FLAGS))


def marks(flags: Iterable[str]) -> str:
    """The flags' one-letter marks, e.g. 'so'."""
    return "".join(FLAGS[f][0] if f in FLAGS else "?" for f in ordered(flags))


def legend(flags: Iterable[str], min_per_class: int = DEFAULT_MIN_PER_CLASS) -> str:
    """'s = fewer than 10 positives or negatives in the test split; o = ...' for these flags."""
    return "; ".join(f"{FLAGS[f][0]} = {FLAGS[f][1].format(m=min_per_class)}"
                     for f in ordered(flags) if f in FLAGS)


def describe(flags: Iterable[str], min_per_class: int = DEFAULT_MIN_PER_CLASS) -> str:
    """The flags in words, comma-separated."""
    return ", ".join(FLAGS[f][1].format(m=min_per_class) if f in FLAGS else f for f in ordered(flags))
