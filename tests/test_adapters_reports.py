"""kind: reports: Bajwa et al.'s keyword labeller (Table 1) reproduces their Table 2; negation;
rules."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from chestfed.common.labels import FINDINGS, INDEX, NO_FINDING
from chestfed.sites.adapters.base import SiteDataError
from chestfed.sites.adapters.radiology_reports import ReportsAdapter, load_rules

# Table 2 of Bajwa et al.: report text and the labels their labeller gave it.
TABLE2 = [
    ("In place NG tube and right-sided CVP line are again noted. Minimal left pleural effusion "
     "with underlying lung consolidation/ atelectasis is again noted. Infiltrates are again "
     "noted in bilateral upper and right mid zones. Minimal atelectatic changes in the right "
     "lung base are seen. Rest of the findings are unchanged.",
     {"Atelectasis", "Effusion"}),
    ("There are persistent inhomogenous areas of airspace opacification in right lung. Mild "
     "interval increase in the inhomogenous areas of airspace opacification in left lung is "
     "noted. There is interval development of mild inhomogenous haziness in bilateral lower zone "
     "obscuring both CP angles and diaphragmatic outlines suggesting pleural effusions with "
     "underlying atelectasis on left.",
     {"Atelectasis", "Effusion", "Pneumonia"}),
    ("Portable technique and AP position are limiting details. There is moderate right pleural "
     "effusion with underlying consolidation or atelectasis . Mild left pleural effusion is also "
     "noted. There is accentuation of bronchovascular markings in both lungs. No pneumothorax is "
     "present. Cardiomeastinal magnification may be due to AP projection however requires "
     "follow-up with proper positioning to rule out cardiomegaly . Degenerative changes are "
     "noted in the bones. Soft tissues are unremarkable.",
     {"Atelectasis", "Effusion", "Cardiomegaly"}),
    ("There is re-demonstration of prominent interstitial markings. No collapse or consolidation "
     "is noted. There is no pneumothorax. There is persistent blunting of left CP angle likely "
     "due to pleural thickening or pleural effusion . Right CP angle is normal. Cardiomegaly . "
     "cardiac pacemaker with its intact leads are again noted. Rest of the findings are "
     "unchanged.",
     {"Cardiomegaly", "Effusion"}),
    ("No definite evidence of any consolidation, collapse or pneumothorax is seen. Both hila and "
     "cardiomeastinal contours appear normal. Both CP angles are acute. Both hemidiaphragm "
     "appear normal. No evidence of any bony lesion seen. CONCLUSION: Normal study.",
     {NO_FINDING}),
]
RULED = ["Atelectasis", "Effusion", "Pneumonia", "Cardiomegaly", NO_FINDING]


def site(root: Path, reports: list[str], **cols) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, text in enumerate(reports):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": text, "patient": f"p{i}", **cols})
    pd.DataFrame(rows).to_csv(root / "reports.csv", index=False)
    return root


OPTS = {"csv": "reports.csv", "path_column": "image", "report_column": "text",
        "patient_column": "patient"}


@pytest.mark.parametrize("negation", [False, True])
def test_default_rules_reproduce_table_2(tmp_path, negation):
    root = site(tmp_path / "s", [t for t, _ in TABLE2])
    adapter = ReportsAdapter("shifa", str(root), {**OPTS, "negation": negation})
    rec = adapter.records()
    assert [n for n in FINDINGS if rec.annotated[INDEX[n]]] == sorted(RULED, key=FINDINGS.index)
    for i, (_, want) in enumerate(TABLE2):
        got = {n for n in RULED if rec.labels[i, INDEX[n]] == 1}
        assert got == want, (i, got, want)
        assert all(rec.labels[i, INDEX[n]] == 0 for n in RULED if n not in want)
    others = [INDEX[n] for n in FINDINGS if n not in RULED]
    assert np.isnan(rec.labels[:, others]).all()
    hits = rec.extras["rule_hits"]
    assert list(hits.columns) == sorted(RULED, key=FINDINGS.index)
    assert adapter.rule_hit_counts == {"Atelectasis": 3, "Effusion": 4, "Pneumonia": 1,
                                       "Cardiomegaly": 2, NO_FINDING: 1}
    assert hits["Pneumonia"][1] == "opacification"
    assert hits[NO_FINDING][4] == "normal study"


def test_negation(tmp_path, caplog):
    reports = ["No pleural effusion. Atelectasis at the left base.",
               "Heart size normal, without cardiomegaly.",
               "Negative for atelectasis but a small left pleural effusion.",
               "No pneumothorax. Bilateral pleural effusion.",
               "",
               "Not a normal study: air space opacification in the right lower zone."]
    root = site(tmp_path / "s", reports)
    plain = ReportsAdapter("s", str(root), OPTS).records()
    caplog.set_level("INFO")
    adapter = ReportsAdapter("s", str(root), {**OPTS, "negation": True})
    neg = adapter.records()
    E, A, C, P, N = (INDEX[n] for n in ("Effusion", "Atelectasis", "Cardiomegaly", "Pneumonia",
                                        NO_FINDING))
    assert plain.labels[0, E] == 1 and neg.labels[0, E] == 0 and neg.labels[0, A] == 1
    assert plain.labels[1, C] == 1 and neg.labels[1, C] == 0
    assert neg.labels[2, A] == 0 and neg.labels[2, E] == 1  # 'but' ends the negation
    assert neg.labels[3, E] == 1
    assert np.isnan(neg.labels[4]).all()  # blank report: unknown
    assert neg.labels[5, N] == 0 and neg.labels[5, P] == 1 and plain.labels[5, N] == 1
    assert adapter.rule_negated_counts["Effusion"] == 1
    assert neg.extras["rule_negated"]["Cardiomegaly"][1] == "cardiomegaly"
    assert "rule hits" in caplog.text and "negated" in caplog.text


def test_custom_rules_and_bad_rules(tmp_path):
    root = site(tmp_path / "s", ["Right pneumothorax.", "Clear lungs."])
    rules = tmp_path / "rules.yaml"
    rules.write_text("labels:\n  Pneumothorax: [pneumothorax]\n  no finding: [clear lungs]\n")
    rec = ReportsAdapter("s", str(root), {**OPTS, "rules": str(rules)}).records()
    np.testing.assert_array_equal(rec.labels[:, INDEX["Pneumothorax"]], [1, 0])
    np.testing.assert_array_equal(rec.labels[:, INDEX[NO_FINDING]], [0, 1])

    rules.write_text("labels:\n  Pneumothoraks: [pneumothorax]\n")
    with pytest.raises(SiteDataError, match="did you mean 'Pneumothorax'"):
        ReportsAdapter("s", str(root), {**OPTS, "rules": str(rules)})
    rules.write_text("labels:\n  Pneumothorax: [pneumothorax]\nnegation:\n  cues: [no, not]\n")
    with pytest.raises(SiteDataError, match="bare no as false"):
        ReportsAdapter("s", str(root), {**OPTS, "rules": str(rules)})
    rules.write_text("label:\n  Pneumothorax: [pneumothorax]\n")
    with pytest.raises(SiteDataError, match="unknown key"):
        ReportsAdapter("s", str(root), {**OPTS, "rules": str(rules)})
    with pytest.raises(SiteDataError, match="not found"):
        ReportsAdapter("s", str(root), {**OPTS, "rules": str(tmp_path / "none.yaml")})
    with pytest.raises(SiteDataError, match=r"has no column 'report'.*option 'report_column'"):
        ReportsAdapter("s", str(root), {**OPTS, "report_column": "report"}).records()


def test_default_rules_file_is_table_1():
    rules = load_rules("configs/sites/report_rules.yaml", "test")
    words = {n: [k for k, _ in v] for n, v in rules.labels.items()}
    assert words["Pneumonia"] == ["air space opacification", "air space consolidation",
                                  "opacification", "zone infiltrates"]
    assert words["Atelectasis"] == ["atelectasis", "atelectatic bands"]
    assert words["Cardiomegaly"] == ["cardiomegaly", "enlarged cardiac size"]
    assert words[NO_FINDING][:2] == ["normal study", "unremarkable study"]
    assert words["Effusion"][:3] == ["bilateral pleural effusion", "right sided pleural effusion",
                                     "left sided pleural effusion"]


def test_where_keeps_rows_and_their_rule_hits_line_up(tmp_path):
    texts = ["Cardiomegaly.", "Normal study.", "Right sided pleural effusion.", "Atelectasis."]
    root = site(tmp_path / "s", texts)
    table = pd.read_csv(root / "reports.csv")
    table["view"] = ["PA", "LATERAL", "AP", "lateral"]
    table.to_csv(root / "reports.csv", index=False)
    adapter = ReportsAdapter("shifa", str(root), {**OPTS, "view_column": "view",
                                                  "views": ["PA", "AP"]})
    rec = adapter.records()
    assert rec.meta["image_id"].tolist() == ["0.png", "2.png"]
    assert adapter.row_filters == [("views [PA, AP] (column 'view')", 2)]
    assert rec.extras["rule_hits"]["Effusion"].tolist() == ["", "right sided pleural effusion"]
    assert adapter.locate(1) == "reports.csv line 4 ('2.png')"
