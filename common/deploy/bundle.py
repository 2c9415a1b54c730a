"""The app bundle (FAB) that `flwr run` sends to every site: code only (common/, sites/, server/
Python files and the adapters' built-in resources), never an experiment config, a run or data;
and its SHA-256, which a hospital can pin (`launch/site.py --trust`)."""
from __future__ import annotations

import hashlib
import tempfile

import shutil
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]
APP_PARTS = ("common", "sites", "server")  # the FAB's code (Python files only)
# ... and the adapters' built-in resources, which are code too: the phantom hospitals' presets
# (sites/phantom/spec.py) and the report-keyword rules (sites/adapters/radiology_reports.py). No
# experiment config travels in the bundle: a site is told its part of the experiment in
# messages (common/protocol.py).
APP_RESOURCES = ("configs/sites",)


def stage_app(dest: Path, repo: Path = REPO) -> Path:
    """Copy just the Flower App to `dest`: pyproject.toml, the Python code of common/ sites/
    server/, and the adapters' resources (APP_RESOURCES, YAML). `flwr run` bundles that folder:
    code, never the coordinator's experiment configs, runs, caches or the venv.

    The code goes under `chestfed/` (common/ -> chestfed/common/, ...), the name it is imported
    by (pyproject.toml's package-dir): Flower puts the bundle's folder first on sys.path, so a
    site runs the bundle's code, whose hash it pinned, not whatever else is installed there."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(repo / "pyproject.toml", dest / "pyproject.toml")
    for parts, keep in ((APP_PARTS, (".py",)), (APP_RESOURCES, (".yaml", ".yml"))):
        for part in parts:
            src = repo / part
            if not src.is_dir():
                continue
            for f in src.rglob("*"):
                if f.is_file() and f.suffix in keep and "__pycache__" not in f.parts:
                    target = dest / "chestfed" / f.relative_to(repo)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target)
    return dest


# Flower builds a FAB deterministically (fixed zip dates, sorted entries), so the same code gives
# the same hash at the coordinator and in a hospital's own checkout (`launch/site.py --bundle-hash`).
def bundle_sha256(app_dir: Path) -> str:
    """The hash of the FAB Flower builds from `app_dir` (as `flwr run app_dir` does)."""
    from flwr.cli.build import build_fab_from_disk  # lazy: flwr loads only when this runs

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def checkout_bundle_sha256() -> str:
    """The hash of the bundle this checkout's launch/server.py would ship."""
    with tempfile.TemporaryDirectory(prefix="chestfed-app-") as tmp:
        return bundle_sha256(stage_app(Path(tmp) / "app"))
