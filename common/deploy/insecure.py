"""The banner both launchers (launch/server.py, launch/site.py) print under --insecure: a run
without TLS and without SuperNode authentication must never look like a normal one."""
from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

INSECURE_BANNER = """
#################################################################################
#  WARNING: --insecure: TLS is OFF and SuperNode authentication is OFF.          #
#  Model weights and metrics travel in clear text, and ANY machine that can       #
#  reach this port can join the federation as a site and receive the model.      #
#  Use this only on a closed test network or loopback.                           #
#################################################################################
"""


def warn_insecure(stream: Any = None) -> None:
    print(INSECURE_BANNER, file=stream or sys.stderr, flush=True)
    log.warning("running WITHOUT TLS and WITHOUT SuperNode authentication (--insecure)")
