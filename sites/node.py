"""Who this node is and what a message tells it: the node's own settings (never sent by the
coordinator), its part of the experiment, which site it is, its data and where it writes its
split table. sites/app.py's handlers start from these."""
from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message

from chestfed.common import protocol as P
from chestfed.common.config import ExperimentConfig, SiteConfig, config_from_yaml
from chestfed.common.privacy.disclosure import min_cell_for
from chestfed.sites.data import SiteData, load_site, write_split
from chestfed.sites.pooled import load_pooled
from chestfed.sites.worker import check_root_visible

log = logging.getLogger(__name__)

# Each site is told its own part of the experiment, so a simulation worker serving hundreds of
# sites would hold hundreds of configs: the newest few are kept.
_CONFIGS: OrderedDict[str, ExperimentConfig] = OrderedDict()
MAX_CONFIGS = 64


def deployed(context: Context) -> bool:
    """A SuperNode started by launch/site.py names its site; a simulated node has a partition id."""
    return "site" in context.node_config


def node_settings(context: Context) -> dict[str, Any]:
    """This node's own settings, never sent by the coordinator: the SuperNode's --node-config
    (launch/site.py: `site`, `workdir`, `cache-dir`, `splits-dir`, ...), or in simulation the
    launcher's (`cache-dir`, `splits-dir`, `egress-dir`, `state-dir`), which
    server/simulation/node_app.py adds to the node config with every message."""
    return dict(context.node_config)


def experiment(msg: Message, context: Context | None = None) -> ExperimentConfig:
    """This site's part of the experiment (common/protocol.py), with the site's own image cache
    (`cache-dir` of `node_settings`; a config that names none keeps the config's, else the default)."""
    text = str(msg.content[P.CONFIG][P.EXPERIMENT])
    cache = str(node_settings(context).get("cache-dir", "")) if context is not None else ""
    key = hashlib.sha256(f"{text}|{cache}".encode()).hexdigest()
    if key in _CONFIGS:
        _CONFIGS.move_to_end(key)
        return _CONFIGS[key]
    cfg = config_from_yaml(text)
    if cache:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": cache})})
    _CONFIGS[key] = cfg
    while len(_CONFIGS) > MAX_CONFIGS:
        _CONFIGS.popitem(last=False)
    return cfg


def min_cell(cfg: ExperimentConfig, context: Context) -> int:
    """privacy.min_cell (unset: 5 deployed, 0 simulated); a site's own `min-cell` node config
    can only raise it."""
    own = int(node_settings(context).get("min-cell", 0) or 0)
    return max(own, min_cell_for(cfg.privacy.min_cell, deployed(context)))


def is_pooled_node(cfg: ExperimentConfig, context: Context, conf: ConfigRecord | None = None) -> bool:
    """Simulation adds one node past the sites when a strategy pools data."""
    if deployed(context):
        return False
    if conf is not None and P.SITE in conf:
        return str(conf[P.SITE]) == P.POOLED_NODE
    pid = context.node_config.get("partition-id")  # a message without the site key (tests)
    return pid is not None and int(pid) == len(cfg.sites)


def my_site(cfg: ExperimentConfig, context: Context, conf: ConfigRecord | None = None) -> SiteConfig:
    """Which site this node is.

    Deployment: the SuperNode's --node-config names it (`site`, optionally `kind`, `root`,
    `options`, over the site entry the coordinator sent). Simulation: the message's `SITE` key
    (the coordinator learnt from the discovery's HELLO which partition is which site); a
    message without it (tests) falls back to the partition id indexing the config's site list.
    """
    nc = context.node_config
    if "site" in nc:
        name = str(nc["site"])
        try:
            site = cfg.site(name)
        except Exception:
            site = SiteConfig(name=name, kind=str(nc.get("kind", "phantom")))
        if "kind" in nc or "root" in nc:
            site = site.model_copy(update={k: str(nc[k]) for k in ("kind", "root") if k in nc})
        if str(nc.get("options", "")).strip():  # launch/site.py --option: JSON, over the config's
            site = site.model_copy(update={"options": {**site.options, **json.loads(str(nc["options"]))}})
        return site
    if conf is not None and P.SITE in conf:
        return cfg.site(str(conf[P.SITE]))
    return cfg.sites[int(nc["partition-id"])]


def split_dir(context: Context, msg: Message) -> Path | None:
    """Where this site writes its split table (image and patient ids, never sent anywhere).

    Deployment: the hospital's own `splits-dir` (launch/site.py --workdir), under the run's
    name. Simulation: the `splits-dir` the launcher gave the nodes (the run folder's splits/).
    Neither is ever in a message: the coordinator sends the run's name only.
    """
    local = node_settings(context)
    own = str(local.get("splits-dir", ""))
    if not own:
        return None
    if deployed(context):
        return Path(own) / str(msg.content[P.CONFIG].get(P.RUN_NAME, "run"))
    return Path(own)


def site_data(cfg: ExperimentConfig, context: Context, msg: Message) -> SiteData:
    """This site's data (the pooled node: the pooled sites'), its split table written once."""
    conf = msg.content[P.CONFIG]
    if is_pooled_node(cfg, context, conf):
        sites = str(conf.get(P.POOL_SITES, "")) or ",".join(s.name for s in cfg.sites)
        for name in sites.split(","):
            check_root_visible(cfg.site(name))
        return load_pooled(cfg, sites.split(","), P.POOLED_NODE)
    site = my_site(cfg, context, conf)
    if not deployed(context):
        check_root_visible(site)
    data = load_site(cfg, site, progress=False)
    folder = split_dir(context, msg)
    if folder is not None and not (folder / f"{site.name}.csv").exists():
        write_split(data, folder)
    return data
