"""Check sites before anything starts: what `describe.py` reads, what every launcher checks.

`check_site` reads one site as a run would, short of decoding images: the kind and its options
(with did-you-mean), the root, the label table (CSV parsing, label mapping, duplicate rows), that
it annotates one of the task's labels, that every listed image file exists (one `os.stat` each;
`decode=True` also decodes every image, as `describe --check-images` does), and that the split a
run makes holds at least one readable image in train, test and (when `data.split.val` > 0) val.
A problem is a ChestFedError with one line naming the site, and the file and line where known.

Missing or unreadable images: with `data.on_bad_image: error` they are an error here (the run
would stop on the first one); with `skip` (the default) a warning with their count and the first
few (the run skips and counts them, in the cache's bad_images.csv), unless no image or a whole
split would be left.

`check_sites` runs it for every site of a config and returns the problems (errors and warnings)
instead of raising: launch/simulate.py, compare.py and server.py call it before Ray or a
SuperLink starts, and leave with exit 2 and no run folder on an error; launch/site.py checks its
own data the same way before it joins. Nothing here imports torch, flwr or ray.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chestfed.common.errors import ChestFedError
from chestfed.common.labels import annotated_targets, targets
from chestfed.sites.adapters.base import ADAPTER_MODULES, SiteAdapter, SiteDataError, SiteRecords, make_adapter
from chestfed.sites.imageio import inside_root
from chestfed.common.meta import absent_fields, missing_line

SHOWN = 3  # missing or unreadable images named in a message
OUTSIDE = "outside the site root (through a symlink)"


@dataclass
class Problem:
    site: str
    message: str
    error: bool = True

    def __post_init__(self) -> None:
        self.message = " ".join(self.message.split("\n"))  # one line, whatever raised it


@dataclass
class Checked:
    """One site, read and checked. `bad`: record index -> why it cannot be read."""

    adapter: SiteAdapter
    records: SiteRecords
    files: bool = False  # whether image files were looked at (file-based adapters)
    decoded: bool = False
    bad: dict[int, str] = field(default_factory=dict)
    split: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)

    def missing(self) -> list[int]:
        return [i for i, why in self.bad.items() if why == "missing"]

    def outside(self) -> list[int]:
        return [i for i, why in self.bad.items() if why == OUTSIDE]

    def unreadable(self) -> list[int]:
        return [i for i, why in self.bad.items() if why not in ("missing", OUTSIDE)]


def reachable(site: Any) -> bool:
    """Whether this machine has the site's data: a generated site, or its root exists here."""
    return site.kind == "phantom" or bool(site.root and Path(site.root).expanduser().exists())


def _where(adapter: SiteAdapter) -> str:
    return f"site '{adapter.name}' ({adapter.kind})"


def _locate(adapter: SiteAdapter, i: int) -> str:
    locate = getattr(adapter, "locate", None)
    return locate(i) if locate else f"record {i}"


def _stat_files(adapter: SiteAdapter, n: int) -> dict[int, str]:
    """Record index -> 'missing' for every listed image that is not a file, OUTSIDE for one
    whose symlinks lead out of the site's root. One stat each (and one realpath per folder)."""
    paths = getattr(adapter, "_paths", None)
    if paths is None or len(paths) != n:
        return {}
    bad: dict[int, str] = {}
    root = getattr(adapter, "root", None)
    folders: dict[str, str] = {}
    for i, p in enumerate(paths):
        try:
            if not stat.S_ISREG(os.stat(p).st_mode):
                bad[i] = "missing"
            elif root is not None and not inside_root(root, p, folders):
                bad[i] = OUTSIDE  # a run refuses to read it (sites/imageio.py check_inside)
        except OSError:
            bad[i] = "missing"
    return bad


def _decode(adapter: SiteAdapter, n: int, skip: dict[int, str], size: int) -> dict[int, str]:
    reader = adapter.worker_reader()
    bad: dict[int, str] = {}
    for i in range(n):
        if i in skip:
            continue
        try:
            reader(i, size)
        except ChestFedError as exc:
            bad[i] = str(exc)
    return bad


def _bad_line(adapter: SiteAdapter, c: Checked, what: str, idx: list[int]) -> str:
    first = ", ".join(_locate(adapter, i) for i in idx[:SHOWN])
    more = " ..." if len(idx) > SHOWN else ""
    return (f"{_where(adapter)}: {len(idx)} of {len(c.records)} listed images are {what}: "
            f"{first}{more}")


def check_site(site: Any, cfg: Any = None, *, files: bool = True, decode: bool = False
               ) -> Checked:
    """Read and check one site (a SiteConfig). Raises ChestFedError with one line on a problem.

    Without `cfg` (a site checking its own data before it knows the experiment) the task, split
    and on_bad_image checks are left out, and missing images are warnings.
    """
    adapter = make_adapter(site)
    rec = adapter.records()
    where = _where(adapter)
    if len(rec) == 0:
        raise SiteDataError(f"{where}: no images (check root and filters)")
    c = Checked(adapter, rec)
    task = cfg.task.task() if cfg is not None else None
    if task is not None:
        y = targets(rec.labels, task, rec.annotated)
        if not annotated_targets(rec.annotated, task).any():
            raise SiteDataError(f"{where}: annotates none of the task's labels "
                                f"({', '.join(task.names)})")
    if cfg is not None and cfg.model.meta:  # model.meta: the fields must be in the table

        absent = absent_fields(rec.meta, cfg.model.meta)
        if absent and cfg.model.meta_missing != "allow":
            raise SiteDataError(missing_line(site.name, absent))
        if absent:
            c.warnings.append(f"{where}: no {', '.join(absent)} in its data; encoded as missing "
                              "(model.meta_missing: allow)")
    if files and hasattr(adapter, "_paths"):
        c.files = True
        c.bad = _stat_files(adapter, len(rec))
        if decode:
            c.decoded = True
            size = cfg.data.image_size if cfg is not None else 64
            c.bad.update(_decode(adapter, len(rec), c.bad, size))
    missing, unreadable = c.missing(), c.unreadable()
    strict = cfg is not None and cfg.data.on_bad_image == "error"
    for idx, what in ((missing, "missing"), (c.outside(), OUTSIDE), (unreadable, "unreadable")):
        if not idx:
            continue
        line = _bad_line(adapter, c, what, idx)
        if strict:
            raise SiteDataError(f"{line}; fix the table or the files, or set "
                                "data.on_bad_image: skip to leave them out")
        if len(c.bad) == len(rec):
            raise SiteDataError(f"{line}; no image is left")
        c.warnings.append(f"{line}; a run skips them (data.on_bad_image: skip)")
    if task is not None:
        from chestfed.sites.splits import SPLITS, make_splits  # lazy: brings in sklearn

        c.split = make_splits(rec.meta, y[:, 0], cfg.data.split, cfg.seed)
        ok = np.ones(len(rec), dtype=bool)
        ok[list(c.bad)] = False
        for name in SPLITS:
            if name == "val" and cfg.data.split.val == 0:
                continue
            if not (ok & (c.split == name)).any():
                n_pat = rec.meta["patient_id"].nunique()
                readable = f", {int(ok.sum())} readable" if c.bad else ""
                raise SiteDataError(
                    f"{where}: its {name} split would be empty ({len(rec)} images{readable}, "
                    f"{n_pat} patients); a site needs at least one image in train, val and test "
                    "(more images or patients, or the data.split settings)")
    return c


class _Capture(logging.Handler):
    """Holds the adapters' warnings during a check, so a failed check prints one line only."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def check_sites(cfg: Any, names: list[str] | None = None, *, sites: list[Any] | None = None,
                reachable_only: bool = False, capture_logs: bool = True,
                keep: dict[str, Checked] | None = None) -> list[Problem]:
    """Check every site of `cfg` (or those named, or `sites`); errors and warnings, one line each.

    `keep`, if given, receives each site that passed, by name, so the caller can reuse the
    tables it read (the launchers' cache step does) instead of reading them again.

    `reachable_only` (the coordinator of a deployment): a site whose data is not on this machine
    gets its kind checked only (its options may come from the hospital's `site.py --option`).
    `cfg` may be None with `sites` given (a hospital's site.py without the experiment config).
    """
    problems: list[Problem] = []
    for site in (sites if sites is not None else cfg.sites):
        if names is not None and site.name not in names:
            continue
        if reachable_only and not reachable(site):
            if site.kind not in ADAPTER_MODULES:
                try:
                    make_adapter(site)
                except ChestFedError as exc:
                    problems.append(Problem(site.name, str(exc)))
            continue
        logger = logging.getLogger("chestfed.sites")
        handler, propagate = _Capture(), logger.propagate
        if capture_logs:
            logger.addHandler(handler)
            logger.propagate = False
        try:
            checked = check_site(site, cfg)
        except ChestFedError as exc:
            problems.append(Problem(site.name, str(exc)))
            continue
        finally:
            if capture_logs:
                logger.removeHandler(handler)
                logger.propagate = propagate
        for line in dict.fromkeys(handler.lines + checked.warnings):
            problems.append(Problem(site.name, line, error=False))
        if keep is not None:
            keep[site.name] = checked
    return problems
