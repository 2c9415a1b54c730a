"""The report: report.md + a self-contained report.html, checked in a real headless browser.

Results are built the way a run builds them (sites/scoring.py on arrays -> the evaluator's reply
parser -> server.results.build_results -> results.json on disk), without training anything.
The e2e test runs the real launcher through Flower's Simulation Engine.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chestfed.common import protocol as P
from chestfed.common.config import config_from_tree
from chestfed.server.evaluation import evaluator as E
from chestfed.server.evaluation.results import build_results
from chestfed.server.report import write_comparison_report, write_report
from chestfed.common.atomic import jsonable
from chestfed.server.run.folder import RunFolder
from chestfed.sites import scoring as S

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Cardiomegaly", "Effusion"]
SITES = ["s0", "s1", "quiet"]


class _Model:
    def __init__(self, name, trained_on, local_bn=False):
        self.name, self.trained_on, self.local_bn, self.meta = name, trained_on, local_bn, {}


class _Sites:  # what results.json reads of the run's SiteLink
    site_info = {s: {"n_train": 100, "n_val": 20, "n_test": 30, "n_bad": 0} for s in SITES}
    data_warnings: list[str] = []


class _Record:  # ... and of its RoundRecord
    images_processed, optimizer_steps, site_trainings, dropouts, failed_models = 600, 40, 6, [], []


def make_results(seed: int = 0, strategy: str = "local", labels: list[str] = LABELS,
                 min_cell: int = 0) -> dict:
    """A realistic results dict: two models x three sites, the third site single-class."""
    cfg = config_from_tree({"experiment": "rep", "seed": seed, "task": {"type": "multilabel", "labels": labels},
                            "sites": [{"name": s, "kind": "phantom"} for s in SITES],
                            "eval": {"bootstrap": 30, "roc_points": 40}}, "test")
    models = [_Model("local-s0", ["s0"]), _Model("fedavg", ["s0", "s1"])]
    deployable = {"local-s0": {"Cardiomegaly": 0.5, "Effusion": math.nan}, "fedavg": {"Cardiomegaly": 0.45, "Effusion": 0.5}}
    pairs = E.model_pairs(models)
    rng = np.random.default_rng(seed)
    matrix = {m.name: {} for m in models}
    pair_out = {}
    for k, site in enumerate(SITES):
        n = 60
        t = len(labels)
        y = (rng.random((n, t)) < 0.3).astype(float) if site != "quiet" else np.zeros((n, t))
        scores = {m.name: np.clip(0.4 * y + rng.normal(0.3 + 0.05 * i, 0.2, (n, t)), 0, 1)
                  for i, m in enumerate(models)}
        plan = S.Plan(P.EVAL_MODE_SCORE, "test", [S.ModelSpec(m.name, thresholds=deployable[m.name]) for m in models],
                      pairs=pairs, bootstrap=30, seed=seed, roc_points=40)
        metrics, reasons = S.score_models(y, scores, labels, np.arange(n) // 2, plan)
        reasons |= S.release(metrics, min_cell)  # what the site's app does before replying
        metrics["num-examples"] = n
        info = {"name": site} | {f"reason:{key}": v for key, v in reasons.items()}
        cells, pair_out[site] = E.parse_site_reply(site, models, labels, S.to_wire(metrics), info, deployable, pairs)
        for name, cell in cells.items():
            matrix[name][site] = cell
    thresholds = {m: {label: {"threshold": t, "sources": {"s0": {"youden": t, "n_pos": 5, "n_neg": 15}}}
                      for label, t in per.items()} for m, per in deployable.items()}
    thresholds["local-s0"]["Effusion"]["reason"] = "undefined on every training site's validation split"
    ev = E.Evaluation("test", matrix, pair_out, thresholds, E.settings_of(cfg.eval, cfg.seed), 1.5)
    res = build_results(cfg, models, matrix, {m.name: f"checkpoints/{m.name}.pt" for m in models},
                        record=_Record(), sites=_Sites(), eval_seconds=1.5, evaluation=ev)
    res["strategy"] = strategy
    return {"status": "complete", **res}


def make_run(tmp_path: Path, **kw) -> Path:
    run = RunFolder(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.write_results(make_results(**kw))  # NaN -> null, as a real run writes it
    run.append_metrics([{"round": r, "model": "local-s0", "site": "s0", "train_loss": 0.7 - 0.1 * r,
                         "val_auroc": 0.6 + 0.05 * r} for r in (1, 2, 3)])
    return run.path


def test_write_report_writes_md_html_and_figures(tmp_path):
    run = make_run(tmp_path)
    paths = write_report(run)
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert paths["html"] == run / "report.html" and paths["heatmap"].is_file()
    figs = sorted(p.name for p in (run / "figures").glob("*.png"))
    assert {"matrix_auroc.png", "label_bars.png", "roc_s0.png", "roc_quiet.png", "agreement.png",
            "training.png"} <= set(figs)
    for name in figs:  # every figure in the md, every figure inlined in the html
        assert f"figures/{name}" in md
    assert page.count('src="data:image/png;base64,') == len(figs)
    # self-contained: nothing to fetch, and a policy that forbids fetching anyway
    for text in (md, page):
        assert "http://" not in text and "https://" not in text
    refs = re.findall(r'(?:src|href)="([^"#][^"]*)"', page)
    assert refs and all(u.startswith("data:image/png;base64,") for u in refs)
    assert "default-src 'none'" in page
    # the single-class site is n/a with its reason, never 0.5
    matrix_md = md.split("## The matrix")[1].split("## Operating")[0]
    header = next(line for line in matrix_md.splitlines() if line.startswith("| model |"))
    col = [c.strip() for c in header.split("|")].index("quiet")
    for model in ("local-s0", "fedavg"):
        row = next(line for line in matrix_md.splitlines() if line.startswith(f"| {model} |"))
        assert [c.strip() for c in row.split("|")][col] == "n/a †o"  # flagged: one class
    assert "fedavg at quiet: no label has both classes present" in md
    # internal marks, Table 7 averages, significance, thresholds
    assert re.search(r"\| local-s0 \| [0-9.]+ \[[0-9.]+, [0-9.]+\]\* \|", md)
    assert "| Cardiomegaly | Average |" in md and "±" in md
    assert "DeLong p" in md and "Wilcoxon p" in md and "kappa (deployable)" in md
    assert "undefined on every training site's validation split" in md
    assert 'class="int' in page


def _md_table(md: str, after: str) -> list[dict[str, str]]:
    """The first Markdown table after the line `after`, as rows of {header: text}."""
    lines = md.split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return [dict(zip(rows[0], r)) for r in rows[2:]]


def _p(text: str) -> str:
    from chestfed.server.report import fmt_p

    return fmt_p(text)


def test_significance_tables_show_holm_next_to_raw_and_say_which_delong(tmp_path):
    from chestfed.common.stats import holm

    run = make_run(tmp_path)
    write_report(run)
    md = (run / "report.md").read_text()
    res = json.loads((run / "results.json").read_text())
    assert "Holm" in md and "the family is every p-value shown in this table" in md
    # per site: the family is the table's DeLong p-values and its over-labels t / Wilcoxon
    st = res["pairs"]["s1"]["local-s0|fedavg"]
    family = [st["labels"][x]["delong_p"] for x in LABELS] + [st["over_labels"]["t_p"], st["over_labels"]["w_p"]]
    adj = holm([math.nan if v is None else v for v in family])
    rows = _md_table(md, "#### Test site s1")
    for row, label, a in zip(rows, LABELS, adj):
        assert row["label"] == label and row["DeLong"] == "patient-clustered"
        assert row["DeLong p"] == _p(st["labels"][label]["delong_p"]) and row["DeLong p (Holm)"] == _p(a)
        assert row["patients"] == "30" and row["n"] == "60"  # two images per patient
    # the plain DeLong is kept, labelled image-level, with its own Holm column
    ref = _md_table(md, "#### Image-level DeLong, for reference")
    assert [r["test site"] for r in ref] == ["s0", "s0", "s1", "s1", "quiet", "quiet"]
    row = ref[3]
    assert row["image-level DeLong p"] == _p(st["labels"]["Effusion"]["delong_image_p"])
    img = holm([math.nan if r["delong_image_p"] is None else r["delong_image_p"]
                for s in SITES for r in res["pairs"][s]["local-s0|fedavg"]["labels"].values()])
    assert row["image-level DeLong p (Holm)"] == _p(img[3])
    # between models: what was paired, Holm over both tests of every pair
    comp = _md_table(md, "### Between models")[0]
    c = res["comparisons"]["local-s0|fedavg"]
    assert comp["paired over"] == "(label, test site) cells" == c["paired_over"]
    assert comp["t-test p (Holm)"] == _p(holm([c["t_p"], c["w_p"]])[0]) == _p(c["t_p_holm"])
    assert comp["Wilcoxon p (Holm)"] == _p(c["w_p_holm"])


def test_binary_task_pairs_over_test_sites_and_seeds(tmp_path):
    one = make_results(labels=["Cardiomegaly"])
    assert one["comparisons"]["local-s0|fedavg"]["paired_over"] == "test sites"
    run = RunFolder(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.write_results(one)
    write_report(run.path)
    md = (run.path / "report.md").read_text()
    assert "### Between models, over test sites" in md and "pairing over labels is impossible" in md
    assert "| local-s0 vs fedavg | over labels |" not in md  # nothing to pair at a site
    runs = [json.loads(json.dumps(jsonable(make_results(seed=s, labels=["Cardiomegaly"])))) for s in (0, 1, 2)]
    md = write_comparison_report(tmp_path / "cmp", runs)["md"].read_text()
    row = _md_table(md, "## Significance")[0]
    # 2 sites with both classes x 3 seeds (the quiet site has no AUROC)
    assert row["paired over"] == "(test site, seed) cells" and row["pairs"] == "6"
    assert row["t-test p"] != "n/a" and "Wilcoxon p (Holm)" in row
    assert "pairs at one test site share its test images" in md


def test_report_marks_flagged_cells_and_shows_counts(tmp_path):
    res = make_results()
    cell = res["matrix"]["fedavg"]["s1"]
    cell["labels"]["Cardiomegaly"]["flags"] = ["small_n", "constant_predictor"]
    cell["flags"] = ["small_n", "constant_predictor"]
    res["sites"]["quiet"]["class_counts"] = {"train": {"Cardiomegaly": {"n_pos": 0, "n_neg": 40}}}
    res["data_warnings"] = ["site quiet, train split: one class only for Cardiomegaly (0+/40-)"]
    run = RunFolder(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.write_results(res)
    write_report(run.path)
    md = (run.path / "report.md").read_text()
    matrix_md = md.split("## The matrix")[1].split("## Operating")[0]
    row = next(line for line in matrix_md.splitlines() if line.startswith("| fedavg |"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[3].endswith("†sc*")  # internal and flagged: small n, constant predictor
    assert cells[4] == "n/a †o"
    counts = next(line for line in matrix_md.splitlines() if line.startswith("| test n+/n− |"))
    n_pos = cell["n_pos"]
    assert f"| {n_pos}/{cell['n_neg']} |" in counts and "| 0/60 |" in counts
    assert "s = fewer than 10 positives or negatives in the test split" in matrix_md
    assert "c = constant predictor" in matrix_md and "hatched †" in matrix_md
    # Table 7: counts per label and site, the flagged label marked
    t7 = md.split("## Per label")[1].split("## ROC")[0]
    assert "| label | test site | n+/n− | local-s0 | fedavg |" in t7
    lab = cell["labels"]["Cardiomegaly"]
    row = next(line for line in t7.splitlines() if line.startswith("| Cardiomegaly | s1 |"))
    assert f"| {lab['n_pos']}/{lab['n_neg']} |" in row and row.rstrip(" |").endswith("†sc")
    assert "| Effusion | quiet | 0/60 |" in t7
    # sites: class counts per split, the run's warnings; notes: every flagged cell in words
    assert "| quiet | Cardiomegaly | 0/40 | masked | masked |" in md
    assert "- warning: site quiet, train split: one class only for Cardiomegaly (0+/40-)" in md
    assert (f"flagged: fedavg at s1, Cardiomegaly ({lab['n_pos']}+/{lab['n_neg']}-): fewer than 10 "
            "positives or negatives in the test split, constant predictor") in md
    assert "flagged: local-s0 at quiet, Effusion (0+/60-): one class only in the test split" in md
    # the flagged heatmap still renders (hatching and marks on a figure)
    assert (run.path / "figures" / "matrix_auroc.png").stat().st_size > 1000


def test_suppressed_counts_are_nan_with_a_reason_and_the_report_says_so(tmp_path):
    res = make_results(min_cell=25)  # 60 images per site: some confusion counts fall below 25
    cell = res["matrix"]["fedavg"]["s0"]
    gone = [k for k, why in cell["reasons"].items() if why.startswith("suppressed:")]
    assert gone and all(k.rsplit("/", 1)[-1] in ("tp", "fp", "tn", "fn") for k in gone)
    assert all(math.isnan(cell["metrics"][k]) for k in gone)
    assert not math.isnan(cell["metrics"]["macro_auroc"])  # the rest keeps its meaning
    run = RunFolder(tmp_path / "run")
    run.path.mkdir(parents=True)
    run.write_results(res)
    write_report(run.path)
    md = (run.path / "report.md").read_text()
    assert "disclosure control:" in md and "<25" in md
    assert "ROC curves as TPR on a fixed grid of 51 FPR values" in md
    plain = make_results()  # simulation default (min_cell 0): nothing suppressed
    assert "disclosure control:" not in "\n".join(
        str(v) for row in plain["matrix"].values() for c in row.values() for v in c["reasons"].values())


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    run = make_run(tmp_path)
    import chestfed.server.run.folder as rf
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rf.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_report(run)
    left = [p.name for p in run.rglob("*") if p.is_file()]
    assert "report.html" not in left and "report.md" not in left
    assert not [n for n in left if n.startswith(".")], left  # no half-written temporaries


def test_comparison_report_and_rerender(tmp_path):
    runs = [make_results(seed=0, strategy="local"), make_results(seed=1, strategy="local")]
    runs = [json.loads(json.dumps(jsonable(r))) for r in runs]  # as read back from disk
    out = tmp_path / "cmp"
    paths = write_comparison_report(out, runs)
    md = paths["md"].read_text()
    agg = json.loads((out / "comparison.json").read_text())
    assert agg["cells"]["fedavg"]["s0"]["n"] == 2 and "± " in md
    assert "Paired t-test and Wilcoxon" in md
    assert "http://" not in paths["html"].read_text()
    # launch/report.py re-renders it from comparison.json alone
    (out / "report.html").unlink()
    assert launcher("report").main([str(out)]) == 0
    assert (out / "report.html").is_file()
    # ... and compares run folders
    for i, r in enumerate(runs):
        RunFolder(tmp_path / f"r{i}").path.mkdir()
        RunFolder(tmp_path / f"r{i}").write_results(r)
    assert launcher("report").main([str(tmp_path / "r0"), str(tmp_path / "r1"), "--out", str(tmp_path / "c2")]) == 0
    assert (tmp_path / "c2" / "report.md").read_text() == md
    assert launcher("report").main([str(tmp_path / "r0"), str(tmp_path / "r1")]) == 2  # no --out


def launcher(name: str):
    """A launch/ script as a module (in process: no second interpreter start-up)."""
    import importlib

    return importlib.import_module(f"chestfed.launch.{name}")


def test_html_template_escapes_text_and_marks_cells():
    """report.html comes from a Jinja2 template with autoescaping: a site name from a config
    cannot inject markup; numbers right-align, internal / n/a cells keep their classes, and a
    repeated heading gets its own anchor."""
    from chestfed.server.report import Cell, Doc

    doc = Doc("<b>title</b>")
    doc.h(1, "The matrix")
    doc.p("a & b")
    doc.table(["site", "AUROC"], [[Cell("<script>x</script>"), Cell("0.812", "int")],
                                  [Cell("s1"), Cell("n/a", "na")]], note="note <i>")
    doc.h(1, "The matrix")
    from chestfed.server.report.html import render

    page = render(doc)
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "<title>&lt;b&gt;title&lt;/b&gt;</title>" in page and "<p>a &amp; b</p>" in page
    assert '<td class="int n">0.812</td>' in page and '<td class="na n">n/a</td>' in page
    assert '<p class="note">note &lt;i&gt;</p>' in page
    assert 'id="the_matrix"' in page and 'id="the_matrix-2"' in page
    assert "font-family:system-ui,-apple-system,'Segoe UI'" in page  # the CSS is not escaped
    assert "default-src 'none'" in page


def test_report_renders_from_the_app_bundle(tmp_path):
    """The ServerApp of a deployment writes the report from the bundle `flwr run` ships (Python
    files only): the template must come with the code, not from a file left behind."""
    from chestfed.common.deploy.bundle import stage_app

    app = stage_app(tmp_path / "app")
    code = ("import chestfed.server.report.html as h; from chestfed.server.report import Doc, Cell; d = Doc('t'); "
            "d.table(['a'], [[Cell('1')]]); print(h.__file__); print(h.render(d))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=app, env={**os.environ, "PYTHONPATH": str(app)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where, page = proc.stdout.split("\n", 1)
    assert Path(where).is_relative_to(app)
    assert '<td class="n">1</td>' in page and page.rstrip().endswith("</html>")


# --- a real browser --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK = ("<script>window.addEventListener('load',function(){var i=Array.from(document.images);"
         "var ok=i.filter(function(x){return x.complete&&x.naturalWidth>0}).length;"
         "var d=document.createElement('div');d.id='img-check';d.textContent='decoded '+ok+' of '+i.length;"
         "document.body.appendChild(d);});</script>")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                    "(apt-get install -y chromium); the browser check of report.html is skipped")
def test_report_html_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    page = (run / "report.html").read_text()
    n_img = page.count("<img ")
    assert n_img >= 6
    # 1) every <img> decodes: a copy with a tiny script that writes the count into the DOM
    #    (the report's own policy forbids scripts, so the copy drops that one meta tag)
    probe = tmp_path / "probe.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page)
                     .replace("</body>", CHECK + "</body>"))
    proc = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r"decoded (\d+) of (\d+)", proc.stdout)
    assert found, (proc.stdout[-500:], proc.stderr[-2000:])
    assert found.group(1) == found.group(2) == str(n_img)
    # 2) the report itself (policy on) paints: a screenshot that is not blank
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}",
                     (run / "report.html").as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape[0] >= 1000 and img.std() > 10  # text, tables and heatmaps, not a blank page
    dark = (img < 128).mean()
    assert 0.01 < dark < 0.9


# --- end to end, through the Simulation Engine -----------------------------------------------------


@pytest.mark.e2e
def test_simulated_run_writes_the_evaluation_and_report(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from e2e import only_run, simulate, tiny_config

    healthy = {"name": "healthy", "kind": "phantom", "options": {
        "preset": "a", "population": {"size": 60, "prevalence": {
            f: 0.0 for f in ("Cardiomegaly", "Effusion", "Consolidation", "Pneumonia", "Nodule", "Mass",
                             "Atelectasis", "Pneumothorax", "Edema")}},
        "labeller": {"noise": 0.0}}}
    cfg = tiny_config(tmp_path, n_sites=1, size=90)
    import yaml

    tree = yaml.safe_load(cfg.read_text())
    tree["sites"].append(healthy)
    tree["eval"] = {"bootstrap": 30}
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    proc = simulate(cfg, "--strategy", "local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(tmp_path)
    res = json.loads((run / "results.json").read_text())
    assert set(res["matrix"]) == {"local-site0", "local-healthy"}
    assert res["matrix"]["local-site0"]["site0"]["internal"] is True
    assert res["matrix"]["local-healthy"]["site0"]["internal"] is False
    cell = res["matrix"]["local-healthy"]["site0"]
    assert cell["metrics"]["labels/Abnormal/op/threshold"] is None  # undefined: only negatives in val
    assert "deployable threshold is NaN" in cell["reasons"]["Abnormal/op"]
    good = res["matrix"]["local-site0"]["site0"]
    assert good["metrics"]["labels/Abnormal/op/threshold"] == pytest.approx(
        res["thresholds"]["local-site0"]["Abnormal"]["threshold"])
    m = good["metrics"]
    assert 0 <= m["macro_auroc_lo"] <= m["macro_auroc"] <= m["macro_auroc_hi"] <= 1
    roc = good["roc"]["Abnormal"]  # a ROC curve: from (0, 0) to (1, 1), never going back
    assert len(roc["fpr"]) == len(roc["tpr"]) >= 2
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
    assert all(b >= a for xs in (roc["fpr"], roc["tpr"]) for a, b in zip(xs, xs[1:]))
    assert res["matrix"]["local-site0"]["healthy"]["metrics"]["macro_auroc"] is None  # NaN on disk
    assert res["thresholds"]["local-healthy"]["Abnormal"]["threshold"] is None
    pair = res["pairs"]["site0"]["local-site0|local-healthy"]["labels"]["Abnormal"]
    assert pair["n"] == res["sites"]["site0"]["n_test"] and 0 <= pair["delong_p"] <= 1
    assert -1 <= pair["spearman"] <= 1
    assert "report:" in proc.stdout
    md = (run / "report.md").read_text()
    assert "local-site0 at healthy: only negatives" in md
    page = (run / "report.html").read_text()
    assert "http://" not in page and "https://" not in page
