"""Check before starting: every site mistake fails in seconds, one line, exit 2, no run folder.

The launcher tests run the real scripts as subprocesses (like tests/e2e.py) and report which of
ray / flwr / torch got imported: a failed check must leave before any of them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from chestfed.common.config import config_from_tree
from chestfed.sites.preflight import check_site, check_sites

REPO = Path(__file__).resolve().parents[1]

# Runs a launcher in-process, then prints which heavy modules it imported (last stdout line).
RUNNER = """
import json, runpy, sys
sys.path.insert(0, {launch!r})
sys.argv = {argv!r}
code = 0
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps(sorted(m for m in ("ray", "flwr", "torch") if m in sys.modules)))
sys.exit(code)
"""


def launch(script: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float,
                                                         list[str]]:
    code = RUNNER.format(launch=str(REPO / "launch"), script=str(REPO / "launch" / script),
                         argv=[script, *args])
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=120)
    heavy = json.loads(p.stdout.strip().splitlines()[-1])
    return p, time.perf_counter() - t0, heavy


def folder(root: Path, rows: list[dict], make: bool = True) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for r in rows:
        if make and not (root / r["file"]).exists():
            Image.fromarray(np.full((12, 12), 90, np.uint8)).save(root / r["file"])
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def good_rows(n: int = 20) -> list[dict]:
    return [{"file": f"img/{i:03d}.png", "patient": f"P{i}",
             "finding": "NORMAL" if i % 2 else "PNEUMONIA"} for i in range(n)]


OPTS = {"csv": "labels.csv", "path_column": "file", "patient_column": "patient",
        "findings_column": "finding", "values": {"NORMAL": "No Finding", "PNEUMONIA": "Pneumonia"}}


def csv_site(name: str, root: Path, **opts: object) -> dict:
    return {"name": name, "kind": "csv", "root": str(root), "options": {**OPTS, **opts}}


def tree(tmp_path: Path, sites: list[dict], **data: object) -> dict:
    return {"experiment": "pre", "output_dir": str(tmp_path / "runs"),
            "data": {"image_size": 32, "cache_dir": str(tmp_path / "cache"), "workers": 1, **data},
            "sites": sites, "model": {"width": 4}, "strategy": {"rounds": 1, "min_sites": 1}}


def write(tmp_path: Path, t: dict) -> Path:
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump(t, sort_keys=False))
    return f


@pytest.fixture
def broken(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A config with one site per mistake, and what each one's line must say."""
    ok = folder(tmp_path / "ok", good_rows())
    covid = good_rows()
    covid[3]["finding"] = "COVID-19"
    dup = good_rows()
    dup[4]["file"] = dup[1]["file"]
    gone = folder(tmp_path / "gone", good_rows())
    (gone / "img" / "002.png").unlink()
    (gone / "img" / "007.png").unlink()
    sites = [
        {"name": "fine", "kind": "phantom", "options": {"preset": "a",
                                                        "population": {"size": 60}}},
        csv_site("fine_csv", ok),
        {"name": "kind_typo", "kind": "cvs", "root": str(ok)},
        {"name": "preset_typo", "kind": "phantom", "options": {"preset": "d"}},
        csv_site("option_typo", ok, path_colum="file"),
        csv_site("no_root", tmp_path / "nowhere"),
        csv_site("unmapped", folder(tmp_path / "covid", covid)),
        csv_site("duplicate", folder(tmp_path / "dup", dup)),
        csv_site("missing_files", gone),
        csv_site("tiny", folder(tmp_path / "tiny", good_rows(2))),
    ]
    expect = {
        "kind_typo": "site 'kind_typo': unknown kind 'cvs' (did you mean 'csv'?)",
        "preset_typo": "site 'preset_typo': phantom preset 'd' is not known",
        "option_typo": "site 'option_typo' (csv): unknown option 'path_colum' (did you mean "
                       "'path_column'?)",
        "no_root": f"site 'no_root' (csv): root '{tmp_path / 'nowhere'}' does not exist",
        "unmapped": "site 'unmapped' (csv): column 'finding' of labels.csv has the value "
                    "'COVID-19' on line 5, which is not a finding",
        "duplicate": "site 'duplicate' (csv): image 'img/001.png' is listed twice in labels.csv, "
                     "on lines 3 and 6",
        "missing_files": "site 'missing_files' (csv): 2 of 20 listed images are missing: "
                         "labels.csv line 4 ('img/002.png'), labels.csv line 9 ('img/007.png')",
        "tiny": "site 'tiny' (csv): its val split would be empty (2 images, 2 patients)",
    }
    return write(tmp_path, tree(tmp_path, sites, on_bad_image="error")), expect


def test_every_mistake_is_one_line_before_ray_and_no_run_folder(broken, tmp_path):
    config, expect = broken
    p, seconds, heavy = launch("simulate.py", "--strategy", "local", "--config", str(config),
                               cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == len(expect), p.stderr  # one line per broken site, the fine ones silent
    for line, (site, text) in zip(lines, expect.items()):
        assert line.startswith("chestfed: ") and text in line, (site, line)
    assert heavy == [], heavy  # neither Ray nor Flower nor torch was imported
    assert not (tmp_path / "runs").exists()
    assert seconds < 60, seconds  # a few seconds on a quiet machine; never Ray-start slow (checked above)


def test_simulate_one_mistake_one_line(tmp_path):
    rows = good_rows()
    rows[6]["finding"] = "Inconclusive"
    config = write(tmp_path, tree(tmp_path, [csv_site("h", folder(tmp_path / "h", rows))]))
    p, seconds, heavy = launch("simulate.py", "--strategy", "local", "--config", str(config),
                               cwd=tmp_path)
    assert p.returncode == 2 and heavy == []
    assert p.stderr.strip().splitlines() == [
        "chestfed: site 'h' (csv): column 'finding' of labels.csv has the value 'Inconclusive' "
        "on line 8, which is not a finding; map it with option 'values', e.g. values: "
        "{\"Inconclusive\": Pneumonia}, or {\"Inconclusive\": unknown} (1 rows unmapped)"]
    assert p.stdout.strip().splitlines()[:-1] == [] and not (tmp_path / "runs").exists()


def test_compare_checks_once_before_any_folder(broken, tmp_path):
    config, expect = broken
    out = tmp_path / "cmp"
    p, _, heavy = launch("compare.py", "--strategies", "local,fedavg", "--config", str(config),
                         "--out", str(out), cwd=tmp_path)
    assert p.returncode == 2 and heavy == []
    assert len(p.stderr.strip().splitlines()) == len(expect)  # once, not once per strategy
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_server_checks_the_sites_it_can_reach(tmp_path):
    ok = folder(tmp_path / "ok", good_rows())
    sites = [csv_site("here", ok, findings_column="findngs"),
             {"name": "elsewhere", "kind": "csv", "root": "/data/at/the/hospital"},
             {"name": "typo", "kind": "chexpret", "root": "/data/at/the/hospital"}]
    config = write(tmp_path, tree(tmp_path, sites))
    p, _, heavy = launch("server.py", "--config", str(config), "--insecure", cwd=tmp_path)
    assert p.returncode == 2 and "flwr" not in heavy and "ray" not in heavy
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 2, p.stderr  # 'elsewhere' has its data at the hospital: not checked here
    assert "site 'here' (csv): '" in lines[0] and "has no column 'findngs' (did you mean " \
        "'finding'?)" in lines[0] and "(option 'findings_column')" in lines[0]
    assert "unknown kind 'chexpret' (did you mean 'chexpert'?)" in lines[1]
    assert not (tmp_path / "runs").exists()


def test_site_refuses_to_join_with_bad_data(tmp_path):
    rows = good_rows()
    rows[3]["file"] = rows[2]["file"]
    root = folder(tmp_path / "h", rows)
    work = tmp_path / "work"
    args = ["--name", "h", "--kind", "csv", "--root", str(root), "--superlink", "127.0.0.1:9",
            "--insecure", "--workdir", str(work)]
    args += [f"--option={k}={json.dumps(v)}" for k, v in OPTS.items()]
    p, _, heavy = launch("site.py", *args, cwd=tmp_path)
    assert p.returncode == 2 and heavy == []
    assert p.stderr.strip().splitlines() == [
        "chestfed: site 'h' (csv): image 'img/002.png' is listed twice in labels.csv, on lines "
        "4 and 5 (1 duplicate rows)"]
    assert not work.exists()  # nothing made, nothing started


def test_missing_start_files_exit_2_before_ray_with_no_run_folder(tmp_path):
    """model.weights that is not there, and strategy.sequential.init naming a folder that is no
    run: one line each, exit 2, before Ray / Flower / torch, with no run folder (simulate.py,
    compare.py and server.py alike)."""
    site = {"name": "p", "kind": "phantom", "options": {"preset": "a", "population": {"size": 60}}}
    config = write(tmp_path, tree(tmp_path, [site]))
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    missing = tmp_path / "weights" / "densenet.pt"
    wants = [f"chestfed: model.weights: file '{missing}' not found",
             f"chestfed: strategy.sequential.init: folder '{not_a_run}' holds no checkpoint"]
    bad = [f"model.weights={missing}", f"strategy.sequential.init={not_a_run}"]
    cases = [("simulate.py", "--strategy", "sequential", "--config", str(config)),
             ("compare.py", "--strategies", "local,sequential", "--config", str(config),
              "--out", str(tmp_path / "cmp")),
             ("server.py", "--strategy", "sequential", "--config", str(config), "--insecure")]
    for script, *args in cases:
        p, seconds, heavy = launch(script, *args, *bad, cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (script, p.stderr)
        assert len(lines) == 2 and all(line.startswith(w) for line, w in zip(lines, wants)), \
            (script, lines)
        assert "ray" not in heavy and "flwr" not in heavy and "torch" not in heavy, (script, heavy)
        assert seconds < 60, (script, seconds)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cmp").exists()


def test_start_files_the_run_reads_pass_the_check(tmp_path):
    """The check accepts what the run itself loads: a weights file, a checkpoint file, a run
    folder with one final model or only latest.pt (so the check cannot refuse a good start)."""
    from chestfed.server.run.start_files import check_start_files, init_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_bytes(b"x")
    assert init_checkpoint(str(run)) == run / "checkpoints" / "latest.pt"
    (run / "checkpoints" / "final.pt").write_bytes(b"x")
    assert init_checkpoint(str(run)) == run / "checkpoints" / "final.pt"
    (run / "checkpoints" / "best.pt").write_bytes(b"x")
    with pytest.raises(Exception, match="holds 2 models"):
        init_checkpoint(str(run))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    site = {"name": "p", "kind": "phantom", "options": {"preset": "a"}}
    good = tree(tmp_path, [site])
    good["model"]["weights"] = str(weights)
    good["strategy"].update(name="sequential", sequential={"init": str(run / "checkpoints" / "final.pt")})
    assert check_start_files(config_from_tree(good, "x.yaml")) == []
    good["model"]["weights"] = str(tmp_path)
    assert check_start_files(config_from_tree(good, "x.yaml")) == [
        f"model.weights: '{tmp_path}' is a folder; name the weights file in it"]


# --- in-process: the checks themselves ------------------------------------------------------

def test_missing_files_with_skip_are_a_counted_warning(tmp_path):
    root = folder(tmp_path / "h", good_rows())
    (root / "img" / "005.png").unlink()
    cfg = config_from_tree(tree(tmp_path, [csv_site("h", root)]), "test")
    [problem] = check_sites(cfg)
    assert not problem.error
    assert problem.message == ("site 'h' (csv): 1 of 20 listed images are missing: labels.csv "
                               "line 7 ('img/005.png'); a run skips them (data.on_bad_image: skip)")
    for f in (root / "img").iterdir():
        f.unlink()
    [problem] = check_sites(cfg)
    assert problem.error and "20 of 20 listed images are missing" in problem.message
    assert "no image is left" in problem.message


def test_adapter_warnings_are_held_back_and_a_fine_site_is_silent(tmp_path):
    root = folder(tmp_path / "h", good_rows())
    opts = {k: v for k, v in OPTS.items() if k != "patient_column"}
    cfg = config_from_tree(tree(tmp_path, [{"name": "h", "kind": "csv", "root": str(root),
                                            "options": opts},
                                           {"name": "p", "kind": "phantom"}]), "test")
    problems = check_sites(cfg)
    assert [(p.site, p.error) for p in problems] == [("h", False)]
    assert "no patient_column" in problems[0].message


def test_decode_finds_a_truncated_image(tmp_path):
    root = folder(tmp_path / "h", good_rows())
    bad = root / "img" / "004.png"
    bad.write_bytes(bad.read_bytes()[:20])
    cfg = config_from_tree(tree(tmp_path, [csv_site("h", root)]), "test")
    assert check_site(cfg.sites[0], cfg).bad == {}  # exists: a stat is not a decode
    c = check_site(cfg.sites[0], cfg, decode=True)
    assert list(c.bad) == [4] and "1 of 20 listed images are unreadable: labels.csv line 6" \
        in c.warnings[0]


def test_describe_reports_rows_dropped_and_files(tmp_path, capsys):
    rows = good_rows()
    for i, r in enumerate(rows):
        r["view"] = ["PA", "AP", "LL", "PA"][i % 4]
    root = folder(tmp_path / "h", rows)
    (root / "img" / "000.png").unlink()
    config = write(tmp_path, tree(tmp_path, [csv_site("h", root, view_column="view",
                                                      views=["PA", "AP"])]))
    from tests.test_adapters_describe import load_launcher

    cli = load_launcher()
    assert cli.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "rows dropped by views [PA, AP] (column 'view'): 5" in out
    assert "image files: 15 listed, 14 exist (--check-images decodes them)" in out
    assert "warning: site 'h' (csv): 1 of 15 listed images are missing: labels.csv line 2 " \
        "('img/000.png')" in out


def test_describe_does_not_count_an_image_symlinked_out_of_the_root(tmp_path, capsys):
    """A run refuses to read an image whose symlink leads out of the site root, so describe
    and the preflight count it as one that is not there, and say why."""
    root = folder(tmp_path / "h", good_rows())
    elsewhere = tmp_path / "elsewhere.png"
    (root / "img" / "003.png").rename(elsewhere)
    (root / "img" / "003.png").symlink_to(elsewhere)
    (tmp_path / "outside_dir").mkdir()
    (root / "img" / "005.png").rename(tmp_path / "outside_dir" / "005.png")
    (root / "img" / "005.png").symlink_to(tmp_path / "outside_dir" / "005.png")
    (root / "img" / "006.png").rename(root / "inside.png")
    (root / "img" / "006.png").symlink_to(root / "inside.png")  # inside the root: fine
    config = write(tmp_path, tree(tmp_path, [csv_site("h", root)]))
    from tests.test_adapters_describe import load_launcher

    cli = load_launcher()
    assert cli.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "image files: 20 listed, 18 exist (--check-images decodes them)" in out
    assert "warning: site 'h' (csv): 2 of 20 listed images are outside the site root (through a " \
        "symlink): labels.csv line 5 ('img/003.png'), labels.csv line 7 ('img/005.png')" in out


def test_site_checks_its_entry_in_the_experiment_config(tmp_path, capsys):
    from chestfed.launch import site as cli

    root = folder(tmp_path / "h", good_rows())
    config = write(tmp_path, tree(tmp_path, [csv_site("h", tmp_path / "not-here")]))
    base = ["--name", "h", "--superlink", "x:1", "--config", str(config)]
    # the config's root is the coordinator's idea; --root says where the data is here
    assert cli.check_own_data(cli.parse_args(base + ["--root", str(root)]))
    assert not cli.check_own_data(cli.parse_args(base))
    assert "root '" in capsys.readouterr().err
    # --option over the config's options, as sites/app.py merges them
    assert not cli.check_own_data(cli.parse_args(base + ["--root", str(root),
                                                         "--option", "findings_column=nope"]))
    assert "has no column 'nope'" in capsys.readouterr().err
    # nothing known about the data here: nothing to check
    assert cli.check_own_data(cli.parse_args(["--name", "h", "--superlink", "x:1"]))
