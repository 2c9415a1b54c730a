import numpy as np
import pytest

from chestfed.common.labels import ABNORMAL, FINDINGS, NO_FINDING, Task, XRV_PATHOLOGIES, LabelError, annotated_targets, finding_index, targets

N = np.nan


def row(**vals):
    r = np.full(len(FINDINGS), N, dtype=np.float32)
    for k, v in vals.items():
        r[finding_index(k.replace("_", " ") if k not in FINDINGS else k)] = v
    return r


def test_matches_torchxrayvision():
    xrv = pytest.importorskip("torchxrayvision")
    assert list(XRV_PATHOLOGIES) == list(xrv.datasets.default_pathologies)
    assert FINDINGS[-1] == NO_FINDING


def test_abnormal_derivation_respects_site_mask():
    annotated = np.zeros(len(FINDINGS), bool)
    for n in ("Cardiomegaly", "Effusion", NO_FINDING):
        annotated[finding_index(n)] = True
    labels = np.stack([
        row(Cardiomegaly=1, Effusion=0),      # any positive -> 1
        row(Cardiomegaly=0, Effusion=0),      # all annotated negative -> 0 (others unannotated)
        row(Cardiomegaly=0, Effusion=N),      # uncertain, no positive -> unknown
        row(**{"No Finding": 1}),             # explicit normal -> 0
        row(Cardiomegaly=0, Effusion=0, **{"No Finding": 0}),  # a finding outside the space -> 1
    ])
    y = targets(labels, Task("binary"), annotated)
    assert y.shape == (5, 1)
    assert y[0, 0] == 1 and y[1, 0] == 0 and np.isnan(y[2, 0]) and y[3, 0] == 0 and y[4, 0] == 1
    assert Task("binary").names == [ABNORMAL]


def test_multilabel_targets_and_masks():
    labels = np.stack([row(Cardiomegaly=1, Effusion=0), row(Cardiomegaly=0)])
    y = targets(labels, Task("multilabel", ("Effusion", "Cardiomegaly")))
    assert np.isnan(y[1, 0]) and y[0, 0] == 0 and y[0, 1] == 1
    annotated = np.zeros(len(FINDINGS), bool)
    annotated[finding_index("Effusion")] = True
    assert annotated_targets(annotated, Task("multilabel", ("Effusion", "Nodule"))).tolist() == [True, False]


def test_unknown_finding_suggests():
    with pytest.raises(LabelError, match="did you mean 'Effusion'"):
        finding_index("Efusion")
