#!/usr/bin/env python
"""Look at a config's sites without training: what each one holds.

    python launch/describe.py [--config C] [--site NAME] [--json] [key=value ...]

For each site: images and patients, per-finding label counts (positive / negative / unknown) for
the findings it annotates, the findings it masks, the task target's counts, the official split,
views, age (mean / sd / min / max) and sex; the train / val / test split a run would make, with
each split's positives / negatives per task target, and a warning per site, split and target
when a split holds fewer than `eval.min_per_class` positives or negatives, or one class only
(common/caveats.py; every run prints the same warnings); the rows each `where` / `views` rule
dropped; and the image files: each listed one must exist (a stat, not a decode; --check-images
decodes them all). No cache is built. The checks are those every launcher runs before it starts
(sites/preflight.py): a site that fails here fails there, in the same one line.
Exit codes: 0 done, 2 a bad config or a site's data cannot be read (one line on stderr says why).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


import numpy as np

from chestfed.common.caveats import class_counts, split_warnings
from chestfed.common.config import ExperimentConfig, SiteConfig, load_config
from chestfed.common.errors import ChestFedError
from chestfed.common.labels import FINDINGS, annotated_targets, targets

EXIT_USAGE = 2


def describe_records(rec: Any, task: Any = None) -> dict[str, Any]:
    """The numbers `describe` prints, from one site's SiteRecords (no images needed)."""
    meta, labels = rec.meta, rec.labels
    out: dict[str, Any] = {
        "images": int(len(meta)),
        "patients": int(meta["patient_id"].nunique()),
    }
    findings: dict[str, dict[str, int]] = {}
    for j, name in enumerate(FINDINGS):
        if not rec.annotated[j]:
            continue
        col = labels[:, j]
        findings[name] = {"pos": int((col == 1).sum()), "neg": int((col == 0).sum()),
                          "unknown": int(np.isnan(col).sum())}
    out["findings"] = findings
    out["masked"] = [n for j, n in enumerate(FINDINGS) if not rec.annotated[j]]
    if task is not None:
        y = targets(labels, task, rec.annotated)
        ann = annotated_targets(rec.annotated, task)
        out["task"] = {n: ({"pos": int((y[:, k] == 1).sum()), "neg": int((y[:, k] == 0).sum()),
                            "unknown": int(np.isnan(y[:, k]).sum())} if ann[k] else "masked")
                       for k, n in enumerate(task.names)}
    official = meta["official_split"]
    order = {"train": 0, "val": 1, "test": 2}
    counts = official.value_counts()
    out["official_split"] = ({str(k): int(counts[k]) for k in sorted(counts.index,
                                                                     key=lambda k: order.get(k, 9))}
                             if official.notna().any() else None)
    out["views"] = _counts(meta["view"])
    out["sex"] = _counts(meta["sex"])
    age = meta["age"].astype(float)
    known = age.dropna()
    out["age"] = {"known": int(len(known)),
                  "mean": float(known.mean()) if len(known) else None,
                  "sd": float(known.std()) if len(known) > 1 else None,
                  "min": float(known.min()) if len(known) else None,
                  "max": float(known.max()) if len(known) else None}
    hits = rec.extras.get("rule_hits")
    if hits is not None:
        out["rule_hits"] = {str(c): int((hits[c] != "").sum()) for c in hits.columns}
        neg = rec.extras.get("rule_negated")
        if neg is not None:
            out["rule_negated"] = {str(c): int((neg[c] != "").sum()) for c in neg.columns}
    return out


def _counts(series: Any) -> dict[str, int]:
    s = series.astype(object).where(series.notna(), "unknown")
    counts = s.value_counts()
    return {str(k): int(v) for k, v in counts.items()}


def split_counts(rec: Any, task: Any, cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """The split a run makes (sites/splits.py, same seed and settings) and, per split, the
    images and each annotated task target's labelled positives / negatives."""
    from chestfed.sites.splits import SPLITS, make_splits  # lazy: brings in pandas, sklearn

    y = targets(rec.labels, task, rec.annotated)
    ann = annotated_targets(rec.annotated, task)
    split = make_splits(rec.meta, y[:, 0], cfg.data.split, cfg.seed)
    return {name: {"images": int((split == name).sum()),
                   "labels": {label: {"pos": p, "neg": n} for label, (p, n) in
                              class_counts(y[split == name], task.names, ann).items()}}
            for name in SPLITS}


def describe_site(site: SiteConfig, task: Any = None, cfg: ExperimentConfig | None = None,
                  check_images: bool = False) -> dict[str, Any]:
    """`describe_records` for one site, read and checked as every launcher checks it before a
    run (sites/preflight.py: raises ChestFedError on a problem); with the experiment config also
    its splits' class counts and the warnings a run would print (`splits`, `warnings`), the rows
    each `where` / `views` rule dropped (`row_filters`) and the image files (`files`)."""
    from chestfed.sites.preflight import check_site  # lazy: brings in pandas

    checked = check_site(site, cfg, decode=check_images)
    adapter, rec = checked.adapter, checked.records
    info = {"site": site.name, "kind": site.kind, "root": site.root}
    info.update(describe_records(rec, task))
    filters = getattr(adapter, "row_filters", None)
    if filters:
        info["row_filters"] = {rule: n for rule, n in filters}
    if checked.files:
        info["files"] = {"listed": len(rec), "missing": len(checked.missing()),
                         "outside": len(checked.outside()),
                         "decoded": checked.decoded,
                         "unreadable": len(checked.unreadable()) if checked.decoded else None,
                         "problems": checked.warnings}
    if cfg is not None and task is not None:
        info["splits"] = split_counts(rec, task, cfg)
        counts = {k: {label: (c["pos"], c["neg"]) for label, c in v["labels"].items()}
                  for k, v in info["splits"].items()}
        info["min_per_class"] = cfg.eval.min_per_class
        info["warnings"] = split_warnings(site.name, counts, cfg.eval.min_per_class)
    return info


def format_site(d: dict[str, Any]) -> str:
    where = f"{d['kind']}, {d['root']}" if d.get("root") else d["kind"]
    lines = [f"site {d['site']}  ({where})"]
    per = d["images"] / d["patients"] if d["patients"] else 0
    lines.append(f"  images {d['images']}, patients {d['patients']} ({per:.2f} images per patient)")
    if d["official_split"]:
        lines.append("  official split: " + ", ".join(f"{k} {v}" for k, v in
                                                       d["official_split"].items()))
    else:
        lines.append("  official split: none (split patient-wise by ChestFed)")
    for rule, n in (d.get("row_filters") or {}).items():
        lines.append(f"  rows dropped by {rule}: {n}")
    f = d.get("files")
    if f:
        state = (f"{f['listed'] - f['missing'] - f.get('outside', 0) - f['unreadable']} decoded"
                 if f["decoded"]
                 else f"{f['listed'] - f['missing'] - f.get('outside', 0)} exist")
        lines.append(f"  image files: {f['listed']} listed, {state}"
                     + ("" if f["decoded"] else " (--check-images decodes them)"))
        for problem in f["problems"]:
            lines.append(f"  warning: {problem}")
    lines.append("  views: " + _fmt_counts(d["views"]))
    lines.append("  sex: " + _fmt_counts(d["sex"]))
    a = d["age"]
    if a["known"]:
        sd = f"{a['sd']:.1f}" if a["sd"] is not None else "n/a"
        lines.append(f"  age: mean {a['mean']:.1f}, sd {sd}, min {a['min']:g}, max {a['max']:g} "
                     f"({a['known']} known)")
    else:
        lines.append("  age: unknown")
    width = max([len(n) for n in d["findings"]] + [7])
    lines.append(f"  {'finding':<{width}}  {'pos':>7}  {'neg':>7}  {'unknown':>7}")
    for name, c in d["findings"].items():
        lines.append(f"  {name:<{width}}  {c['pos']:>7}  {c['neg']:>7}  {c['unknown']:>7}")
    lines.append("  masked (not annotated): " + (", ".join(d["masked"]) or "none"))
    for name, c in (d.get("task") or {}).items():
        if c == "masked":
            lines.append(f"  task target {name}: masked at this site")
        else:
            lines.append(f"  task target {name}: pos {c['pos']}, neg {c['neg']}, "
                         f"unknown {c['unknown']}")
    if d.get("splits"):
        sp = d["splits"]
        lines.append("  splits (as a run makes them): " + ", ".join(f"{k} {v['images']}"
                                                                   for k, v in sp.items()))
        for label in dict.fromkeys(x for v in sp.values() for x in v["labels"]):
            lines.append(f"  {label} pos/neg per split: " + ", ".join(
                f"{k} {v['labels'][label]['pos']}/{v['labels'][label]['neg']}"
                for k, v in sp.items() if label in v["labels"]))
    for w in d.get("warnings") or []:
        lines.append(f"  warning: {w}")
    if "rule_hits" in d:
        lines.append("  report rule hits: " + ", ".join(f"{k} {v}" for k, v in
                                                         d["rule_hits"].items()))
        if any(d.get("rule_negated", {}).values()):
            lines.append("  negated hits: " + ", ".join(f"{k} {v}" for k, v in
                                                        d["rule_negated"].items()))
    return "\n".join(lines)


def _fmt_counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items()) or "none"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="describe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--site", action="append", help="only this site (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--check-images", action="store_true",
                   help="decode every image (slow on big sites); default: check they exist")
    p.add_argument("--verbose", "-v", action="store_true", help="log what the adapters do")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config values")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["describe"]:  # the old `sites.py describe` form still works
        argv = argv[1:]
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        sites = [cfg.site(n) for n in args.site] if args.site else list(cfg.sites)
        task = cfg.task.task()
        results = []
        for site in sites:
            info = describe_site(site, task, cfg, check_images=args.check_images)
            results.append(info)
            if not args.json:
                print(format_site(info), flush=True)
                print(flush=True)
    except ChestFedError as exc:
        print(f"chestfed: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if args.json:
        print(json.dumps({"experiment": cfg.experiment, "task": task.names, "sites": results},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
