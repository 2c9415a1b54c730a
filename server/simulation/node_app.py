"""A simulated node's own settings, handed to the sites' ClientApp with every message.

Flower gives a simulated node only its partition id (`context.node_config`), and the
coordinator's messages never carry a folder of this machine (a deployed site keeps its own). So
the launcher wraps the sites' ClientApp: before each message the wrapper adds the run's settings
(`cache-dir`, `splits-dir`, `egress-dir`, `state-dir`: sites/node.py `node_settings`) to the
node's config, where a deployed SuperNode's `--node-config` puts them. Ray pickles the wrapper
with every message, so one warm worker serves run after run (server/simulation/warm_pool.py),
each with its own folders, and two runs side by side never share them.
"""
from __future__ import annotations

from typing import Any

from flwr.app import Context, Message


class SimulatedNodeApp:
    """Callable like a ClientApp (Flower's actor calls `app(message=..., context=...)`)."""

    def __init__(self, app: Any, settings: dict[str, str]) -> None:
        self.app, self.settings = app, dict(settings)

    def __call__(self, message: Message, context: Context) -> Message:
        for key, value in self.settings.items():
            context.node_config[key] = value
        return self.app(message=message, context=context)
