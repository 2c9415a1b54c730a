"""The one label space every site maps into, and the tasks derived from it.

Labels are float arrays with 1 (present), 0 (absent) and NaN (not known: the site does not
annotate the finding, or the label was uncertain and the policy says ignore). NaN is the mask:
it neither trains nor scores.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

# torchxrayvision's `default_pathologies` (1.5.7), in its order, plus 'No Finding'.
# Spelled out rather than imported because importing torchxrayvision costs ~3.5 s in every
# site process; tests/test_labels.py checks this list against the installed package.
XRV_PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
    "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
NO_FINDING = "No Finding"
FINDINGS: tuple[str, ...] = XRV_PATHOLOGIES + (NO_FINDING,)
ABNORMAL = "Abnormal"
INDEX = {name: i for i, name in enumerate(FINDINGS)}


class LabelError(ValueError):
    """A label name that is not in the common label space."""


def finding_index(name: str) -> int:
    try:
        return INDEX[name]
    except KeyError:
        close = difflib.get_close_matches(name, FINDINGS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise LabelError(f"unknown finding '{name}'{hint}; known: {', '.join(FINDINGS)}") from None


@dataclass(frozen=True)
class Task:
    """`binary`: normal vs abnormal. `multilabel`: the named findings, in the given order."""

    type: str = "binary"
    labels: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        if self.type == "binary":
            return [ABNORMAL]
        return list(self.labels)


def abnormal(labels: np.ndarray, annotated: np.ndarray | None = None) -> np.ndarray:
    """Derived 'Abnormal' target: 1 if any finding is present, 0 if the image is known normal.

    Known normal means 'No Finding' is 1, or every finding the site annotates is 0 and 'No
    Finding' is not 0; an explicit 'No Finding' = 0 is abnormal. An image with
    an unknown (uncertain) annotated finding and no positive stays NaN, so the loss never learns
    a guess. `annotated` is the site's per-finding mask; by default, columns not entirely NaN.
    """
    n_path = len(XRV_PATHOLOGIES)
    if annotated is None:
        annotated = ~np.all(np.isnan(labels), axis=0)
    cols = np.flatnonzero(np.asarray(annotated, dtype=bool)[:n_path])
    findings = labels[:, cols]
    any_pos = (findings == 1).any(axis=1)
    all_neg = (findings == 0).all(axis=1) & (len(cols) > 0)
    no_finding = labels[:, INDEX[NO_FINDING]]
    out = np.full(len(labels), np.nan, dtype=np.float32)
    out[all_neg | (no_finding == 1)] = 0.0
    # Siwek: abnormal is "not marked normal". A site that says 'No Finding' = 0 saw something,
    # even if it lies outside the label space (PadChest's 'scoliosis', 'COPD signs', ...).
    out[any_pos | (no_finding == 0)] = 1.0
    return out


def targets(labels: np.ndarray, task: Task, annotated: np.ndarray | None = None) -> np.ndarray:
    """Map common-space labels [N, len(FINDINGS)] to the task's targets [N, T] (NaN = masked)."""
    labels = np.asarray(labels, dtype=np.float32)
    if labels.ndim != 2 or labels.shape[1] != len(FINDINGS):
        raise LabelError(f"labels must have shape [N, {len(FINDINGS)}], got {labels.shape}")
    if task.type == "binary":
        return abnormal(labels, annotated)[:, None]
    return labels[:, [finding_index(n) for n in task.labels]]


def annotated_targets(annotated: np.ndarray, task: Task) -> np.ndarray:
    """Which task targets a site annotates, from its per-finding mask."""
    annotated = np.asarray(annotated, dtype=bool)
    if task.type == "binary":
        return np.array([bool(annotated.any())])
    return np.array([annotated[finding_index(n)] for n in task.labels])
