"""Shorter retry waits when a Flower process pulls a message's objects.

Flower 1.41 moves a message's arrays as separate objects. A SuperNode stores a message before its
objects have arrived (flwr/supernode/start_client_internal.py `_pull_and_store_message`), so the
`flwr-clientapp` it starts asks for objects that are not there yet, and retries with a backoff
of 1, 2, 4, 8 s (flwr/supercore/inflatable/inflatable_utils.py `pull_objects`, keyword
defaults PULL_INITIAL_BACKOFF = 1 and PULL_BACKOFF_CAP = 10; measured here: 6-10 s of every
deployed message with weights in it went there). The coordinator's grid pulls its replies the
same way. These defaults are public keyword defaults of the two functions every caller uses;
this sets them, in the calling process only, to SHORT, with enough tries that the overall
patience (PULL_MAX_TIME, 2 h) is unchanged. If a Flower upgrade changed them, nothing is touched
(tests/test_warm_worker.py fails until this file is read against the new source).

Standard library and flwr only: the `flwr-clientapp` wrapper (sites/deploy/clientapp_entry.py)
runs this before any of the project's code may be imported.
"""
from __future__ import annotations

FLOWER = {"initial_backoff": 1, "backoff_cap": 10, "max_tries_per_object": 500}  # Flower 1.41.0
SHORT = {"initial_backoff": 0.05, "backoff_cap": 0.5, "max_tries_per_object": 20_000}


def shorten_pull_backoff() -> bool:
    """Install SHORT in this process; False when Flower's defaults are not FLOWER."""
    from flwr.supercore.inflatable import inflatable_utils as pulls  # lazy: flwr loads only here

    targets = (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree)
    for fn in targets:
        have = fn.__kwdefaults__ or {}
        if any(have.get(k) not in (FLOWER[k], SHORT[k]) for k in FLOWER):
            return False
    for fn in targets:
        fn.__kwdefaults__.update(SHORT)
    return True
