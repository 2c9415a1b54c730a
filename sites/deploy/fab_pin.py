"""A SuperNode that runs only the app bundles its hospital pinned (`launch/site.py --trust`).

Flower 1.41's own mechanism (`flower-supernode --trusted-entities`) accepts only bundles that
carry a Flower-platform signature (`valid_license` plus ed25519 signatures from `flwr app
review`); a bundle `flwr run` builds from a folder has none, so it cannot pin what a coordinator
of ours sends. Here the SuperNode checks the SHA-256 of every bundle it fetches (the same hash
Flower names the bundle by: `flwr run` builds it deterministically) before it is stored,
installed or run, and answers a bundle it was not told to trust the way Flower answers a failed
verification: an error reply (ErrorCode.INVALID_FAB) to the coordinator, and one log line here.

sites/deploy/supernode.py installs it when CHESTFED_TRUST (comma-separated SHA-256 hex
digests) is in the SuperNode's environment.
"""
from __future__ import annotations

import hashlib
import re
from logging import ERROR
from typing import Any, Callable

TRUST_ENV = "CHESTFED_TRUST"
SHA256 = re.compile(r"[0-9a-f]{64}")
REFUSED_LINE = "chestfed: refused the app bundle sha256 {got}: this site trusts only {want}"


class UntrustedBundle(Exception):
    def __init__(self, digest: str):
        super().__init__(digest)
        self.digest = digest


def parse_trust(values: list[str]) -> list[str]:
    """--trust values -> lower-case digests; raises ValueError naming a bad one."""
    out = []
    for v in values:
        d = v.strip().lower()
        if not SHA256.fullmatch(d):
            raise ValueError(f"--trust {v!r} is not a SHA-256 hex digest (64 hex characters)")
        out.append(d)
    return out


def pinned(original: Callable[..., Any], trusted: frozenset[str], log: Callable[[str], None]
           ) -> Callable[..., Any]:
    """Wrap Flower's `_pull_and_store_message`: its `get_fab` must return a trusted bundle."""
    from flwr.app import Message  # lazy: flwr loads only when this runs

    import flwr.supernode.start_client_internal as sci  # lazy: flwr loads only when this runs

    def pull(*, state: Any, object_store: Any, receive: Callable[[], Any],
             get_fab: Callable[[str, int], Any], **kw: Any) -> Any:
        last: dict[str, Any] = {}

        def receive_noting() -> Any:
            got = receive()
            if got is not None:
                last["message"] = got[0]
            return got

        def checked_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            digest = hashlib.sha256(fab.content).hexdigest()
            if digest not in trusted:
                raise UntrustedBundle(digest)
            return fab

        try:
            return original(state=state, object_store=object_store, receive=receive_noting,
                            get_fab=checked_fab, **kw)
        except UntrustedBundle as exc:
            log(REFUSED_LINE.format(got=exc.digest, want=", ".join(sorted(trusted))))
            message = last["message"]
            sci._insert_message(Message(sci.FAB_VERIFICATION_ERROR, reply_to=message),
                                state, object_store)
            return message.metadata.run_id

    return pull


def install(trusted: list[str]) -> None:
    """Patch the SuperNode's message loop in this process (before `flower_supernode()`)."""

    import flwr.supernode.start_client_internal as sci  # lazy: flwr loads only when this runs
    from flwr.supercore import log as flwr_log  # lazy: flwr loads only when this runs

    original = getattr(sci, "_pull_and_store_message", None)
    if original is None or not hasattr(sci, "_insert_message") or \
            not hasattr(sci, "FAB_VERIFICATION_ERROR"):  # refuse rather than run unpinned
        raise SystemExit("chestfed: this Flower version has no SuperNode hook for --trust "
                         "(Flower 1.41 expected); not starting")
    sci._pull_and_store_message = pinned(original, frozenset(trusted),
                                         lambda line: flwr_log(ERROR, "%s", line))

