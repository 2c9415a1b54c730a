"""What every launcher shares: logging, one-line errors, the exit-code rule and signals.

The launchers import the project by its one installed name (`chestfed.*`, pyproject.toml), so
their own folder on the import path shadows nothing, and no launcher edits the import path.
A site's launcher (launch/site.py) needs only this module; what the coordinator's launchers do
before a run (Ray, caches, start files) is in launch/before_run.py.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EXIT_USAGE = 2  # bad config, bad arguments: nothing was run
EXIT_FAILED = 1  # the run started and failed; its folder says why


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("flwr", "ray", "wandb", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)


def fail(message: str) -> None:
    try:
        print(f"chestfed: {message}", file=sys.stderr, flush=True)
    except OSError:  # stderr is a pipe whose reader is gone (its parent was killed): go on closing
        pass


def preflight(cfg: object, *, reachable_only: bool = False, verbose: bool = False,
              keep: dict | None = None) -> bool:
    """Check every site (sites/preflight.py) before Ray or a SuperLink starts; print one line per
    error (or, when there is none, per warning). False if any site has an error: the caller
    exits with EXIT_USAGE and writes nothing. `keep` receives the checked sites (their tables)."""
    from chestfed.sites.preflight import check_sites  # lazy: brings in pandas

    problems = check_sites(cfg, reachable_only=reachable_only, capture_logs=not verbose, keep=keep)
    errors = [p for p in problems if p.error]
    for p in errors or problems:
        fail(p.message if p.error else f"warning: {p.message}")
    return not errors


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP: the run ends `interrupted`, exit 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def interrupt_exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP (what a shell reports for each)."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def ignore_interrupts() -> None:
    """A second Ctrl-C (or a SIGTERM after it) while a run is being closed changes nothing."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _raise_interrupted(signum: int, frame: object) -> None:
    ignore_interrupts()
    raise Interrupted(signum)


def sigterm_as_interrupt() -> None:
    """A `kill`, CI timeout or hang-up ends the run like Ctrl-C does, so the status gets written.

    Ray's `ray.init` replaces the SIGTERM handler with its own (sys.exit, which aborted the
    launcher with exit 134 and left the run 'running'); server/simulation/engine.py puts this one back.
    Only the first signal counts: the handler then ignores further ones.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupted)
