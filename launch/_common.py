"""What every launcher shares: the repo on sys.path, logging, and the error-to-exit-code rule."""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# Ray workers are separate processes: they find common/, sites/, server/ through PYTHONPATH.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

EXIT_USAGE = 2  # bad config, bad arguments: nothing was run
EXIT_FAILED = 1  # the run started and failed; its folder says why


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("flwr", "ray", "wandb", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def fail(message: str) -> None:
    print(f"chestfed: {message}", file=sys.stderr, flush=True)


def sigterm_as_interrupt() -> None:
    """A `kill` (or CI timeout) ends the run like Ctrl-C does, so the status gets written."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)
