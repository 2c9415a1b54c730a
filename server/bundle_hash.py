"""The SHA-256 of the app bundle (FAB) `flwr run` ships: what a hospital pins with
`launch/site.py --trust`. Flower builds a FAB deterministically (fixed zip dates, sorted
entries), so the same code gives the same hash at the coordinator and in a hospital's own
checkout (`launch/site.py --bundle-hash`)."""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path


def bundle_sha256(app_dir: Path) -> str:
    """The hash of the FAB Flower builds from `app_dir` (as `flwr run app_dir` does)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(Path(app_dir))).hexdigest()


def checkout_bundle_sha256() -> str:
    """The hash of the bundle this checkout's launch/server.py would ship."""
    from server.deployment import stage_app

    with tempfile.TemporaryDirectory(prefix="chestfed-app-") as tmp:
        return bundle_sha256(stage_app(Path(tmp) / "app"))
