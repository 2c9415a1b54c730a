#!/usr/bin/env python
"""launch/simulate.py, with named sites whose training fails (tests only).

    CHESTFED_TEST_FAILING_SITES=site1,site2 python tests/failing_sites.py --config ... [args]
    CHESTFED_TEST_FAILING_SITES=site1:setup ...   # fails SecAgg+'s first stage instead

Runs the real launcher unchanged, with one difference: the sites' ClientApp gets one more mod,
innermost (after SecAgg+'s and site-level DP's), which makes the *training* of the named sites
raise, as a hospital whose train images became unreadable after discovery would: its
discovery, validation and evaluation still answer, and under SecAgg+ the failure comes in the
protocol's training stage (collect masked vectors), after the key exchange. Nothing in the
production code knows about it: the mod travels to the Ray workers inside the ClientApp
(pickled by reference: this folder is on the workers' path, server/simulation/ray_session.py).

`site:setup` fails the site's reply to SecAgg+'s setup stage instead (the mod then sits
outermost), as a site that went away before the round's key exchange.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

ENV = "CHESTFED_TEST_FAILING_SITES"
REPO = Path(__file__).resolve().parents[1]


def fail_training(msg: Any, ctxt: Any, call_next: Any, victims: frozenset[str] = frozenset()) -> Any:
    from flwr.app import MessageType

    from chestfed.common import protocol as P

    if (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and P.CONFIG in msg.content.config_records):
        site = str(msg.content[P.CONFIG].get(P.SITE, ""))
        if site in victims:
            raise OSError(f"site '{site}': train images unreadable (cache truncated)")
    return call_next(msg, ctxt)


def fail_setup(msg: Any, ctxt: Any, call_next: Any, victims: frozenset[str] = frozenset()) -> Any:
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from chestfed.common import protocol as P

    if msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records:
        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        site = str(msg.content[P.CONFIG].get(P.SITE, "")) if P.CONFIG in msg.content.config_records else ""
        if stage == Stage.SETUP and site in victims:
            raise ConnectionError(f"site '{site}': gone before the key exchange")
    return call_next(msg, ctxt)


def failing_app(victims: frozenset[str], at_setup: frozenset[str] = frozenset()) -> Any:
    """sites.app's ClientApp, its handlers and mods, plus `fail_training` innermost (and
    `fail_setup` outermost)."""
    from flwr.clientapp import ClientApp

    import chestfed.sites.app as site_app
    from chestfed.sites.privacy import secagg_mod, site_dp_mod

    app = ClientApp(mods=[functools.partial(fail_setup, victims=at_setup), secagg_mod, site_dp_mod,
                          functools.partial(fail_training, victims=victims)])
    app.query()(site_app.query)
    app.train()(site_app.train)
    app.evaluate()(site_app.evaluate)
    return app


def main() -> int:
    from chestfed.launch import simulate as launcher

    import chestfed.sites.app as site_app
    named = [v for v in os.environ.get(ENV, "").split(",") if v]
    site_app.app = failing_app(frozenset(v for v in named if ":" not in v),
                               frozenset(v.split(":")[0] for v in named if v.endswith(":setup")))  # what launch/simulate.py imports as the client app
    return launcher.main()


if __name__ == "__main__":
    sys.exit(main())
