"""What the coordinator's launchers (simulate.py, compare.py, server.py) do around a run: check
the files it starts from and the Ray address, build the sites' image caches before Ray starts,
and leave at once after Ctrl-C, stopping Ray. Apart from launch/cli.py so that the hospital's
launcher (launch/site.py) imports nothing of chestfed.server (tests/test_layout.py).
"""
from __future__ import annotations

import os
import sys
import threading

from chestfed.common.errors import ChestFedError, ConfigError
from chestfed.launch.cli import EXIT_USAGE, fail, ignore_interrupts, preflight
from chestfed.server.run.start_files import check_start_files
from chestfed.server.simulation.resources import check_ray_address, ray_address


def hard_exit(code: int) -> None:
    """Leave now, stopping Ray first.

    After Ctrl-C, Flower's ServerApp thread is still blocked waiting for replies that will never
    come, and a normal exit would wait for it; the run folder already says 'interrupted'.
    A watchdog makes sure we are gone within 10 s even if stopping Ray hangs.
    """
    ignore_interrupts()
    watchdog = threading.Timer(10.0, os._exit, (code,))
    watchdog.daemon = True
    watchdog.start()
    try:
        from chestfed.server.simulation.ray_session import stop_ray  # Ray: only when leaving

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
    """
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
    from chestfed.sites.data import build_caches  # torch and pandas: after the cheap checks

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
