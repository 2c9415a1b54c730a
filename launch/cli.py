"""What every launcher shares: logging, one-line errors, the exit-code rule and signals.

The launchers import the project by its one installed name (`chestfed.*`, pyproject.toml), so
their folder on sys.path shadows nothing and nothing here edits sys.path.
"""
from __future__ import annotations

import logging
import os
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
    from chestfed.sites.preflight import check_sites

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


def hard_exit(code: int) -> None:
    """Leave now, stopping Ray first.

    After Ctrl-C, Flower's ServerApp thread is still blocked waiting for replies that will never
    come, and a normal exit would wait for it; the run folder already says 'interrupted'.
    A watchdog makes sure we are gone within 10 s even if stopping Ray hangs.
    """
    import threading

    ignore_interrupts()
    watchdog = threading.Timer(10.0, os._exit, (code,))
    watchdog.daemon = True
    watchdog.start()
    try:
        from chestfed.server.simulation.ray_session import stop_ray

        stop_ray()
    except Exception:  # we are leaving anyway
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a pipe whose reader is gone
            pass
    os._exit(code)


def start_files(cfgs: list) -> bool:
    """The files the runs start from (model.weights, strategy.sequential.init), checked as the
    coordinator would read them (server/run/start_files.py): one line each; False if any is wrong.
    The coordinator's launchers only: launch/site.py never imports chestfed.server."""
    from chestfed.server.run.start_files import check_start_files

    lines = list(dict.fromkeys(line for cfg in cfgs for line in check_start_files(cfg)))
    for line in lines:
        fail(line)
    return not lines


def prepare_sites(cfg: object, *, verbose: bool = False, configs: list | None = None
                  ) -> int | None:
    """Before Ray starts and before anything of the run is written: check the files the run
    starts from (`start_files`, of `configs`, default [cfg]: compare.py passes every strategy's)
    and every site (`preflight`), then build every site's image cache with a progress bar and a
    line per site, so Ray's workers find it built. None when ready, else the exit code (one line
    printed per problem)."""
    from chestfed.common.errors import ConfigError
    from chestfed.server.simulation.resources import check_ray_address, ray_address

    try:  # an existing Ray cluster named (runtime.ray_address / RAY_ADDRESS) must answer
        check_ray_address(ray_address(cfg.runtime.ray_address))  # type: ignore[attr-defined]
    except ConfigError as exc:
        fail(str(exc))
        return EXIT_USAGE
    files_ok = start_files(configs if configs is not None else [cfg])
    checked: dict = {}
    # the sites are checked even when a file is wrong, so one try shows every mistake
    if not preflight(cfg, verbose=verbose, keep=checked) or not files_ok:
        return EXIT_USAGE
    from chestfed.common.errors import ChestFedError
    from chestfed.sites.data import build_caches

    try:
        build_caches(cfg, tables={name: (c.adapter, c.records) for name, c in checked.items()})
    except ChestFedError as exc:  # e.g. data.on_bad_image: error and an unreadable image
        fail(str(exc))
        return EXIT_USAGE
    except OSError as exc:  # a full disk or an unwritable cache folder
        fail(f"data.cache_dir '{cfg.data.cache_dir}': cannot write the image cache "  # type: ignore[attr-defined]
             f"({exc.strerror or exc})")
        return EXIT_USAGE
    except KeyboardInterrupt:
        fail("interrupted while caching images (no cache is left half-written)")
        return 130
    return None
