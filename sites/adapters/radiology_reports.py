"""A folder of images plus a CSV of free-text reports, labelled by keyword rules: `kind: reports`.

    sites:
      - name: shifa
        kind: reports
        root: /data/shifa
        options:
          csv: reports.csv
          path_column: file
          report_column: report
          rules: configs/sites/report_rules.yaml   # the default: Bajwa et al.'s Table 1 keywords
          negation: false                          # the default, as in Bajwa et al.
          patient_column: patient                  # and age/sex/view/split columns, as `kind: csv`

The rules file (YAML) lists keywords per finding under `labels:`; how they match, and how negation
works, is described in configs/sites/report_rules.yaml. A finding with rules is annotated: 1 if any
of its keywords matches the report, else 0. Every other finding is masked. A blank report gives
unknown labels (NaN) for that image.

`records().extras['rule_hits']` has, per image and per labelled finding, the keyword that matched
('' for none); `extras['rule_negated']` the keyword that matched but was negated. The per-finding
counts are logged and kept in `adapter.rule_hit_counts`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from chestfed.common.labels import NO_FINDING, FINDINGS, INDEX, LabelError
from chestfed.sites.adapters.base import SiteDataError, register
from chestfed.sites.adapters.table_adapter import TableAdapter, TableOptions
from chestfed.sites.adapters.files import canonical_finding

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RULES = "configs/sites/report_rules.yaml"


class ReportsOptions(TableOptions):
    report_column: str
    rules: str = DEFAULT_RULES
    negation: bool = False


@dataclass
class Rules:
    """Compiled keyword rules: finding -> [(keyword, pattern)], and the negation settings."""

    labels: dict[str, list[tuple[str, re.Pattern[str]]]]
    cues: re.Pattern[str] | None = None
    breaks: re.Pattern[str] | None = None
    window: int = 6
    source: str = ""
    path: str = ""
    negation_words: dict[str, list[str]] = field(default_factory=dict)

    def match(self, report: str, negation: bool) -> tuple[dict[str, str], dict[str, str]]:
        """finding -> first keyword that matched (not negated), and finding -> negated keyword."""
        hits: dict[str, str] = {}
        negated: dict[str, str] = {}
        for finding, patterns in self.labels.items():
            for keyword, pat in patterns:
                for m in pat.finditer(report):
                    if negation and self._negated(report, m.start()):
                        negated.setdefault(finding, keyword)
                        continue
                    hits[finding] = keyword
                    break
                if finding in hits:
                    break
        for finding in hits:
            negated.pop(finding, None)
        return hits, negated

    def _negated(self, text: str, start: int) -> bool:
        if self.cues is None:
            return False
        sentence_start = max(text.rfind(c, 0, start) for c in ".;:!?\n") + 1
        before = text[sentence_start:start]
        if self.breaks is not None:
            last_break = None
            for last_break in self.breaks.finditer(before):
                pass
            if last_break is not None:
                before = before[last_break.end():]
        words = re.findall(r"[\w']+", before)
        window = " ".join(words[-self.window:]) if words else ""
        return bool(self.cues.search(window))


def _phrase(words: str) -> str:
    parts = [re.escape(p) for p in re.split(r"[\s-]+", words.strip()) if p]
    return r"[\s-]+".join(parts)


def _alternation(words: list[str]) -> re.Pattern[str] | None:
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(_phrase(w) for w in words) + r")\b", re.IGNORECASE)


def load_rules(path: str | Path, where: str) -> Rules:
    """Read and check a rules file: finding names in the label space, keywords non-empty strings."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = REPO / p
    if not p.is_file():
        raise SiteDataError(f"{where}: option 'rules': '{path}' not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SiteDataError(f"{where}: rules file '{p}' is not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise SiteDataError(f"{where}: rules file '{p}' must be a mapping with 'labels:'")
    unknown = set(tree) - {"source", "labels", "negation"}
    if unknown:
        raise SiteDataError(f"{where}: rules file '{p}': unknown key(s) {sorted(unknown)}; "
                            "known: source, labels, negation")
    raw = tree.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise SiteDataError(f"{where}: rules file '{p}' needs 'labels:' mapping findings to "
                            "lists of keywords")
    labels: dict[str, list[tuple[str, re.Pattern[str]]]] = {}
    for name, keywords in raw.items():
        try:
            finding = canonical_finding(str(name))
        except LabelError as exc:
            raise SiteDataError(f"{where}: rules file '{p}': {exc}") from None
        if isinstance(keywords, str):
            keywords = [keywords]
        if not isinstance(keywords, list) or not keywords or not all(
                isinstance(k, str) and k.strip() for k in keywords):
            raise SiteDataError(f"{where}: rules file '{p}': '{name}' needs a list of keywords")
        if finding in labels:
            raise SiteDataError(f"{where}: rules file '{p}': '{name}' is listed twice")
        labels[finding] = [(k.strip(), re.compile(r"\b" + _phrase(k), re.IGNORECASE))
                           for k in keywords]
    neg = tree.get("negation") or {}
    if not isinstance(neg, dict) or set(neg) - {"cues", "breaks", "window"}:
        raise SiteDataError(f"{where}: rules file '{p}': 'negation' takes cues, breaks, window")
    cues = neg.get("cues", ["no", "not", "without", "negative for"])
    breaks = neg.get("breaks", ["but", "however"])
    for key, words in (("cues", cues), ("breaks", breaks)):
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise SiteDataError(f"{where}: rules file '{p}': negation.{key} must be a list of "
                                "quoted words (YAML reads a bare no as false)")
    window = int(neg.get("window", 6))
    ordered = dict(sorted(labels.items(), key=lambda kv: FINDINGS.index(kv[0])))
    return Rules(ordered, _alternation(cues), _alternation(breaks), window,
                 str(tree.get("source", "")), str(p), {"cues": cues, "breaks": breaks})


@register
class ReportsAdapter(TableAdapter):
    kind = "reports"
    Opts = ReportsOptions

    def __init__(self, name: str, root: str | None, options: dict[str, Any]):
        super().__init__(name, root, options)
        self.rules = load_rules(self.opts.rules, self.where)
        self.rule_hit_counts: dict[str, int] = {}
        self.rule_negated_counts: dict[str, int] = {}

    def make_labels(self, df: pd.DataFrame, csv: Path
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, pd.DataFrame]]:
        col = self.opts.report_column
        self._need_column(df, col, csv, "report_column")
        if self.rules.path:
            self._sources.append(Path(self.rules.path))
        reports = df[col].astype(object).where(df[col].notna(), "").astype(str)
        names = list(self.rules.labels)
        labels = np.full((len(df), len(FINDINGS)), np.nan, dtype=np.float32)
        annotated = np.zeros(len(FINDINGS), dtype=bool)
        annotated[[INDEX[n] for n in names]] = True
        hits = {n: [""] * len(df) for n in names}
        negated = {n: [""] * len(df) for n in names}
        blank = 0
        for i, text in enumerate(reports):
            if not text.strip():
                blank += 1
                continue
            h, ng = self.rules.match(text, self.opts.negation)
            for n in names:
                labels[i, INDEX[n]] = 1.0 if n in h else 0.0
                hits[n][i] = h.get(n, "")
                negated[n][i] = ng.get(n, "")
        if NO_FINDING in names:
            # No normal phrase is not a statement of abnormality: 'No Finding' stays unknown
            # unless a finding was hit (then it is 0). Otherwise the derived 'Abnormal' target
            # would call "No pleural effusion." abnormal (an explicit No Finding = 0 is abnormal).
            others = [INDEX[n] for n in names if n != NO_FINDING]
            nf = INDEX[NO_FINDING]
            unknown = (labels[:, nf] == 0) & ~(labels[:, others] == 1).any(axis=1)
            labels[unknown, nf] = np.nan
        if blank:
            log.warning("%s: %d rows have a blank '%s'; their labels are unknown", self.where,
                        blank, col)
        hit_table, neg_table = pd.DataFrame(hits), pd.DataFrame(negated)
        self.rule_hit_counts = {n: int((hit_table[n] != "").sum()) for n in names}
        self.rule_negated_counts = {n: int((neg_table[n] != "").sum()) for n in names}
        log.info("%s: rule hits %s%s", self.where,
                 ", ".join(f"{n} {c}" for n, c in self.rule_hit_counts.items()),
                 (" (negated: " + ", ".join(f"{n} {c}" for n, c in
                                            self.rule_negated_counts.items()) + ")")
                 if self.opts.negation else "")
        return labels, annotated, {"rule_hits": hit_table, "rule_negated": neg_table}
