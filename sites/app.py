"""The Flower ClientApp: what runs at a hospital.

It answers three kinds of message from the coordinator:
- query  ("who are you?"): loads this site's data (cache, splits) and reports its name and sizes;
- train: trains the received weights on this site's train split, returns weights + aggregates;
- evaluate: scores the received weights on this site's val or test split, returns aggregates.
Only weights and aggregate numbers leave the site: no image, no per-image prediction.
"""
from __future__ import annotations

import hashlib
import logging
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import protocol as P
from common import batchnorm
from common.config import ExperimentConfig, SiteConfig, config_from_yaml
from common.metrics import flatten, score_site
from common.models import build_model, is_batchnorm_key, pick_device
from common.training import inverse_prevalence, masked_bce_np, predict, site_seed, train_epochs
from sites import scoring
from sites.data import SiteData, load_site, write_split
from sites.pooled import load_pooled

log = logging.getLogger(__name__)
app = ClientApp()

_CONFIGS: dict[str, ExperimentConfig] = {}
_MODELS: dict[str, torch.nn.Module] = {}
_FRESH: dict[str, dict[str, torch.Tensor]] = {}
_THREADS_SET = False


def _experiment(msg: Message) -> ExperimentConfig:
    text = str(msg.content[P.CONFIG][P.EXPERIMENT])
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _CONFIGS:
        _CONFIGS[key] = config_from_yaml(text)
    return _CONFIGS[key]


def _is_pooled_node(cfg: ExperimentConfig, context: Context) -> bool:
    """Simulation adds one node past the sites when a strategy pools data."""
    pid = context.node_config.get("partition-id")
    return "site" not in context.node_config and pid is not None and int(pid) == len(cfg.sites)


def _my_site(cfg: ExperimentConfig, context: Context) -> SiteConfig:
    """Which site this node is.

    Deployment: the SuperNode's --node-config names it (`site`, optionally `kind`, `root`).
    Simulation: Flower only gives a partition id, which indexes the config's site list.
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
            import json

            site = site.model_copy(update={"options": {**site.options, **json.loads(str(nc["options"]))}})
        return site
    return cfg.sites[int(nc["partition-id"])]


def _split_dir(context: Context, msg: Message) -> Path | None:
    """Where this site writes its split table (image and patient ids, never sent anywhere).

    Simulation: the run folder. Deployment: the hospital's own `splits-dir` (launch/site.py
    --workdir), under the run's name; the coordinator's run folder is not the site's to write.
    """
    run_dir = msg.content[P.CONFIG].get(P.RUN_DIR)
    if "site" in context.node_config:
        own = str(context.node_config.get("splits-dir", ""))
        return Path(own) / Path(str(run_dir or "run")).name if own else None
    return Path(str(run_dir)) / "splits" if run_dir else None


def _setup(cfg: ExperimentConfig) -> torch.device:
    global _THREADS_SET
    if not _THREADS_SET:
        # One Ray worker per CPU share: more torch threads than that oversubscribes the cores.
        threads = cfg.runtime.threads_per_site or max(1, int(round(cfg.runtime.cpus_per_site)))
        torch.set_num_threads(threads)
        _THREADS_SET = True
    return pick_device(cfg.runtime.device)


def _model(cfg: ExperimentConfig, n_out: int) -> torch.nn.Module:
    """Built once per process and reused: rounds only load new weights into it."""
    key = f"{cfg.model.model_dump_json()}|{n_out}"
    if key not in _MODELS:
        _MODELS[key] = build_model(cfg.model.model_copy(update={"weights": None}), n_out)
    return _MODELS[key]


def _fresh_state(cfg: ExperimentConfig, n_out: int) -> dict[str, torch.Tensor]:
    key = f"fresh|{cfg.model.model_dump_json()}|{n_out}"
    if key not in _FRESH:
        _FRESH[key] = build_model(cfg.model.model_copy(update={"weights": None}), n_out).state_dict()
    return _FRESH[key]


def _load_arrays(model: torch.nn.Module, arrays: ArrayRecord, context: Context, conf: ConfigRecord,
                 cfg: ExperimentConfig, n_out: int) -> str:
    """Load the server's weights; for FedBN, put this site's own BatchNorm back in.

    Returns which BatchNorm is in use: 'global', 'own', or 'adapted' (FedBN model scored at a
    site that never trained it: affine at initial values, statistics re-estimated here).
    """
    state = arrays.to_torch_state_dict()
    if not bool(conf.get(P.KEEP_LOCAL_BN, False)):
        model.load_state_dict(state)
        return "global"
    local = context.state.array_records.get(f"local-bn:{conf.get(P.MODEL, '')}")
    fresh = _fresh_state(cfg, n_out)
    full = {k: (state[k] if k in state else fresh[k]) for k in fresh}
    if local is not None:
        full.update(local.to_torch_state_dict())
    model.load_state_dict(full)
    return "own" if local is not None else "adapted"


def _own_batchnorm(model: torch.nn.Module, data: SiteData, cfg: ExperimentConfig,
                   device: torch.device) -> None:
    """PreciseBN on this site's train split (common/batchnorm.py): FedBN's own BatchNorm, and the
    'adapted' one of a FedBN model this site never trained (no labels used)."""
    batchnorm.reestimate(model, data.splits["train"].images, device, cfg.model.in_channels,
                         cfg.train.batch_size)


def _site_data(cfg: ExperimentConfig, context: Context, msg: Message) -> SiteData:
    conf = msg.content[P.CONFIG]
    if _is_pooled_node(cfg, context):
        sites = str(conf.get(P.POOL_SITES, "")) or ",".join(s.name for s in cfg.sites)
        return load_pooled(cfg, sites.split(","), P.POOLED_NODE)
    site = _my_site(cfg, context)
    data = load_site(cfg, site, progress=False)
    folder = _split_dir(context, msg)
    if folder is not None and not (folder / f"{site.name}.csv").exists():
        write_split(data, folder)
    return data


def _seed(cfg: ExperimentConfig, conf: ConfigRecord, site: str) -> int:
    """Distinct per experiment seed, round and site, and the same on every rerun."""
    names = [s.name for s in cfg.sites]
    idx = names.index(site) if site in names else zlib.crc32(site.encode()) % 1000
    return site_seed(int(conf.get(P.SEED, cfg.seed)), int(conf.get(P.ROUND, 0)), idx)


def _reply(msg: Message, metrics: dict[str, float], site: str, arrays: ArrayRecord | None = None,
           reasons: dict[str, str] | None = None, batchnorm: str = "global") -> Message:
    info = {"name": site, "batchnorm": batchnorm}
    info |= {f"reason:{k}": v for k, v in (reasons or {}).items()}
    content = RecordDict({P.METRICS: MetricRecord(P.clean_metrics(metrics)),
                          P.SITE_INFO: ConfigRecord(info)})
    if arrays is not None:
        content[P.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    cfg = _experiment(msg)
    _setup(cfg)
    data = _site_data(cfg, context, msg)
    info = {**data.summary(), "n_bad": data.n_bad}
    return _reply(msg, info, data.name)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _experiment(msg)
    device = _setup(cfg)
    data = _site_data(cfg, context, msg)
    conf = msg.content[P.CONFIG]
    keep_bn = bool(conf.get(P.KEEP_LOCAL_BN, False))
    model = _model(cfg, len(data.target_names))
    _load_arrays(model, msg.content[P.ARRAYS], context, conf, cfg, len(data.target_names))
    mu = float(conf.get(P.PROX_MU, 0.0))
    global_params = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    tr = data.splits["train"]
    pw = inverse_prevalence(tr.y.numpy()) if cfg.train.pos_weight == "inverse_prevalence" else None
    t0 = time.perf_counter()
    stats = train_epochs(model, tr.images, tr.y, cfg.train, int(conf.get(P.LOCAL_EPOCHS, 1)),
                         _seed(cfg, conf, data.name), device, cfg.model.in_channels,
                         mu, global_params, pw)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if keep_bn:
        bn = {k: v for k, v in state.items() if is_batchnorm_key(k, model)}
        context.state[f"local-bn:{conf.get(P.MODEL, '')}"] = ArrayRecord(bn)
        state = {k: v for k, v in state.items() if k not in bn}
    metrics = {P.NUM_EXAMPLES: len(tr), "train-loss": stats.loss, "images": stats.images,
               "steps": stats.steps, "seconds": time.perf_counter() - t0}
    return _reply(msg, metrics, data.name, ArrayRecord(state))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if P.EVAL_PLAN in msg.content[P.CONFIG]:
        return _evaluate_models(msg, context)  # the final evaluation: several models at once
    cfg = _experiment(msg)
    device = _setup(cfg)
    data = _site_data(cfg, context, msg)
    conf = msg.content[P.CONFIG]
    split = data.splits[str(conf.get(P.SPLIT, "val"))]
    model = _model(cfg, len(data.target_names))
    bn = _load_arrays(model, msg.content[P.ARRAYS], context, conf, cfg, len(data.target_names))
    if bn == "adapted":
        _own_batchnorm(model, data, cfg, device)
    t0 = time.perf_counter()
    scores = predict(model, split.images, device, cfg.model.in_channels)
    y = split.y.numpy().copy()
    y[:, ~data.annotated] = float("nan")  # a finding the site does not annotate is not scored
    result = score_site(y, scores, data.target_names)
    metrics = flatten(result)
    metrics["loss"] = masked_bce_np(y, scores)  # the split's loss: flattening shows convergence
    metrics[P.NUM_EXAMPLES] = len(split)
    metrics["seconds"] = time.perf_counter() - t0
    return _reply(msg, metrics, data.name, reasons=result["reasons"], batchnorm=bn)


def _evaluate_models(msg: Message, context: Context) -> Message:
    """Score every model in the message on one split (sites/scoring.py has the plan format).

    Mode `thresholds` (validation split): each model's Youden threshold per label. Mode `score`
    (test split): per-model metrics with CIs and ROC points, and paired statistics per pair.
    Each model is scored with the BatchNorm FedBN semantics ask for (see `_load_arrays`).
    """
    cfg = _experiment(msg)
    device = _setup(cfg)
    data = _site_data(cfg, context, msg)
    plan = scoring.read_plan(str(msg.content[P.CONFIG][P.EVAL_PLAN]))
    split = data.splits[plan.split]
    n_out = len(data.target_names)
    model = _model(cfg, n_out)
    if plan.mode == P.EVAL_MODE_BATCHNORM:
        return _batchnorm_stats(msg, context, cfg, data, plan, model, device)
    t0 = time.perf_counter()
    scores, info = {}, {"name": data.name}
    for spec in plan.models:
        conf = {P.KEEP_LOCAL_BN: spec.local_bn, P.MODEL: spec.name}
        bn = _load_arrays(model, msg.content[P.EVAL_MODEL_PREFIX + spec.name], context, conf, cfg, n_out)
        if bn == "adapted" or (bn == "own" and cfg.eval.batchnorm == "precise"):
            _own_batchnorm(model, data, cfg, device)  # FedBN: statistics of the final weights
        info[P.EVAL_BATCHNORM_INFO + spec.name] = bn
        scores[spec.name] = (predict(model, split.images, device, cfg.model.in_channels)
                             if len(split) else np.zeros((0, n_out), dtype=np.float32))
    y = split.y.numpy().copy()
    y[:, ~data.annotated] = float("nan")  # a finding the site does not annotate is not scored
    if plan.mode == P.EVAL_MODE_THRESHOLDS:
        metrics, reasons = scoring.val_thresholds(y, scores, data.target_names)
    else:
        groups = split.meta["patient_id"].to_numpy() if "patient_id" in split.meta else None
        metrics, reasons = scoring.score_models(y, scores, data.target_names, groups, plan)
    metrics[P.NUM_EXAMPLES] = len(split)
    metrics["seconds"] = time.perf_counter() - t0
    info |= {f"reason:{k}": v for k, v in reasons.items()}
    content = RecordDict({P.METRICS: MetricRecord(scoring.to_wire(metrics)),
                          P.SITE_INFO: ConfigRecord(info)})
    return Message(content=content, reply_to=msg)


def _batchnorm_stats(msg: Message, context: Context, cfg: ExperimentConfig, data: SiteData,
                     plan: scoring.Plan, model: torch.nn.Module, device: torch.device) -> Message:
    """PreciseBN's site half: each model's BatchNorm statistics under its final weights, from this
    site's train split. Only per-channel means and variances over the whole split leave."""
    t0 = time.perf_counter()
    split = data.splits[plan.split]
    content = RecordDict()
    metrics: dict[str, float] = {}
    for spec in plan.models:
        _load_arrays(model, msg.content[P.EVAL_MODEL_PREFIX + spec.name], context,
                     {P.KEEP_LOCAL_BN: False, P.MODEL: spec.name}, cfg, len(data.target_names))
        used = batchnorm.reestimate(model, split.images, device, cfg.model.in_channels,
                                    cfg.train.batch_size)
        content[P.EVAL_MODEL_PREFIX + spec.name] = ArrayRecord(batchnorm.running_stats(model))
        metrics[f"{P.EVAL_MODEL_KEY}{spec.name}/n_images"] = float(used)
    metrics[P.NUM_EXAMPLES] = float(len(split))
    metrics["seconds"] = time.perf_counter() - t0
    content[P.METRICS] = MetricRecord(metrics)
    content[P.SITE_INFO] = ConfigRecord({"name": data.name})
    return Message(content=content, reply_to=msg)
