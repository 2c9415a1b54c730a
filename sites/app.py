"""The Flower ClientApp: what runs at a hospital.

It answers three kinds of message from the coordinator:
- query: with `HELLO` ("who are you?") only the site's name (a simulated node: its partition);
  otherwise loads this site's data (cache, splits) and reports its name and sizes;
- train: trains the received weights on this site's train split, returns weights + aggregates;
- evaluate: scores the received weights on this site's val or test split, returns aggregates.
Only weights and aggregate numbers leave the site: no image, no per-image prediction, and the
numbers only after the disclosure rules (common/privacy/disclosure.py: ROC curves on a fixed FPR grid,
rounded thresholds, small counts suppressed in a deployment). Every reply is described (keys,
dtypes, shapes) in the site's own egress log (`sites/egress.py`). A message tells a site only its
own part of the experiment (common/protocol.py).
"""
from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from chestfed.common import protocol as P
from chestfed.common import batchnorm
from chestfed.common.config import ExperimentConfig
from chestfed.common.errors import ChestFedError
from chestfed.common.metrics import flatten, score_site
from chestfed.common.models import build_model, is_batchnorm_key, pick_device
from chestfed.common.training import masked_bce_np, predict, round_lr, schedule_length, site_seed, train_epochs
from chestfed.common.meta import site_inputs
from chestfed.common.weights import loss_weights
from chestfed.sites import batchnorm as site_bn, egress, node, scoring
from chestfed.sites.data import SiteData
from chestfed.sites.worker import assigned_gpus, worker_info
from chestfed.sites.privacy import secagg_mod, site_dp_mod
from chestfed.common.privacy import UNIT_WEIGHT
from chestfed.sites.privacy import train_record_dp

log = logging.getLogger(__name__)
# Flower's privacy mods, each acting only on the messages that ask for it (sites/privacy.py):
# SecAgg+ masking of the update, and site-level DP's clipping of it (mode client).
app = ClientApp(mods=[secagg_mod, site_dp_mod])

_MODELS: dict[str, torch.nn.Module] = {}
_FRESH: dict[str, dict[str, torch.Tensor]] = {}
_THREADS_SET = False


def _setup(cfg: ExperimentConfig) -> torch.device:
    global _THREADS_SET
    if not _THREADS_SET:
        # One Ray worker per CPU share: more torch threads than that oversubscribes the cores.
        threads = cfg.runtime.threads_per_site or max(1, int(round(cfg.runtime.cpus_per_site)))
        torch.set_num_threads(threads)
        _THREADS_SET = True
    return pick_device(cfg.runtime.device, assigned_gpus())


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


def _bn_folder(context: Context, msg: Message, site: str) -> Path | None:
    """Where this site keeps FedBN's BatchNorm for this run on its own disk (sites/batchnorm.py)."""
    run = str(msg.content[P.CONFIG].get(P.RUN_NAME, "run"))
    return site_bn.folder(node.node_settings(context), node.deployed(context), run, site)


def _load_arrays(model: torch.nn.Module, arrays: ArrayRecord, context: Context, conf: ConfigRecord,
                 cfg: ExperimentConfig, n_out: int, bn_folder: Path | None = None,
                 before_round: int | None = None) -> str:
    """Load the server's weights; for FedBN, put this site's own BatchNorm back in.

    Returns which BatchNorm is in use: 'global', 'own', or 'adapted' (FedBN model scored at a
    site that never trained it: affine at initial values, statistics re-estimated here).
    """
    state = arrays.to_torch_state_dict()
    if not bool(conf.get(P.KEEP_LOCAL_BN, False)):
        model.load_state_dict(state)
        return "global"
    # training round r starts from round r-1's BatchNorm; scoring uses the newest
    local = site_bn.load(context, bn_folder, str(conf.get(P.MODEL, "")), before_round)
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


def _meta_input(cfg: ExperimentConfig, data: SiteData, split: str) -> dict[str, torch.Tensor]:
    """model.meta: a split's encoded metadata from this site's own table (common/meta.py), as the
    `meta` keyword of train_epochs / predict (empty without model.meta). It never leaves here."""
    enc = site_inputs(data.name, data.splits[split].meta, list(cfg.model.meta),
                      cfg.model.meta_missing == "allow")
    return {} if enc is None else {"meta": torch.from_numpy(enc)}


def _seed(cfg: ExperimentConfig, conf: ConfigRecord, site: str) -> int:
    """Distinct per experiment seed, round and site, and the same on every rerun. The site's
    index in the experiment's site list comes in the message (a site is not told the others)."""
    if P.SITE_INDEX in conf:
        idx = int(conf[P.SITE_INDEX])
    else:
        names = [s.name for s in cfg.sites]
        idx = names.index(site) if (site in names and P.SITE not in conf) else zlib.crc32(site.encode()) % 1000
    return site_seed(int(conf.get(P.SEED, cfg.seed)), int(conf.get(P.ROUND, 0)), idx)


@app.query()
def query(msg: Message, context: Context) -> Message:
    conf = msg.content[P.CONFIG]
    if P.HELLO in conf:  # discovery's first step: who are you? (no experiment sent yet)
        nc = context.node_config
        who = {"name": str(nc["site"])} if "site" in nc else {"partition": int(nc.get("partition-id", -1))}
        content = RecordDict({P.METRICS: MetricRecord({}), P.SITE_INFO: ConfigRecord(who)})
        return egress.send(msg, content, context)
    cfg = node.experiment(msg, context)
    _setup(cfg)
    data = node.site_data(cfg, context, msg)
    info = {**data.summary(), "n_bad": data.n_bad}
    return egress.reply(msg, info, data.name, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = node.experiment(msg, context)
    device = _setup(cfg)
    data = node.site_data(cfg, context, msg)
    conf = msg.content[P.CONFIG]
    keep_bn = bool(conf.get(P.KEEP_LOCAL_BN, False))
    model = _model(cfg, len(data.target_names))
    round_ = int(conf.get(P.ROUND, 0))
    _load_arrays(model, msg.content[P.ARRAYS], context, conf, cfg, len(data.target_names),
                 _bn_folder(context, msg, data.name), round_ or None)
    mu = float(conf.get(P.PROX_MU, 0.0))
    global_params = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    tr = data.splits["train"]
    weights = loss_weights(cfg.train, tr.y.numpy())  # train.pos_weight / task_weights
    weights |= _meta_input(cfg, data, "train")
    pw = weights.pop("pos_weight", None)
    t0 = time.perf_counter()
    lr = (float(conf[P.LR]) if P.LR in conf  # train.lr_schedule plateau: the coordinator's rate
          else round_lr(cfg.train, int(conf.get(P.ROUND, 0)), int(conf.get(P.LR_ROUNDS, 0)) or schedule_length(cfg)))
    privacy_metrics: dict[str, float] = {}
    if cfg.privacy.dp.level == "record":  # DP-SGD with Opacus (sites/privacy.py)

        stats, privacy_metrics = train_record_dp(model, tr, cfg, int(conf.get(P.LOCAL_EPOCHS, 1)),
                                                 _seed(cfg, conf, data.name), device, mu,
                                                 global_params, pw, lr)
    else:
        stats = train_epochs(model, tr.images, tr.y, cfg.train, int(conf.get(P.LOCAL_EPOCHS, 1)),
                             _seed(cfg, conf, data.name), device, cfg.model.in_channels,
                             mu, global_params, pw, lr=lr, **weights)
    if cfg.privacy.dp.level == "site":  # Flower's DP noise assumes an unweighted mean of sites

        privacy_metrics[UNIT_WEIGHT] = 1.0
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if keep_bn:
        bn = {k: v for k, v in state.items() if is_batchnorm_key(k, model)}
        site_bn.save(context, _bn_folder(context, msg, data.name), str(conf.get(P.MODEL, "")),
                     round_, ArrayRecord(bn))
        state = {k: v for k, v in state.items() if k not in bn}
    metrics = {P.NUM_EXAMPLES: len(tr), "train-loss": stats.loss, "images": stats.images,
               "steps": stats.steps, "seconds": time.perf_counter() - t0, "lr": lr,
               **privacy_metrics}
    # simulation: which Ray node and GPUs trained it (metrics.jsonl); {} when deployed
    worker = {} if node.deployed(context) else worker_info()
    return egress.reply(msg, metrics, data.name, context, ArrayRecord(state), worker=worker)


def _readable_split(cfg: ExperimentConfig, split: str) -> str:
    """A tuning trial's experiment (eval.final_split: val) never reads the test split, whatever a
    message asks (the coordinator refuses to ask, too)."""
    if split == "test" and cfg.eval.final_split != "test":
        raise ChestFedError("this run scores on validation only (eval.final_split: val); "
                            "the test split is not read")
    return split


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    if P.EVAL_PLAN in msg.content[P.CONFIG]:
        return _evaluate_models(msg, context)  # the final evaluation: several models at once
    cfg = node.experiment(msg, context)
    device = _setup(cfg)
    data = node.site_data(cfg, context, msg)
    conf = msg.content[P.CONFIG]
    split_name = _readable_split(cfg, str(conf.get(P.SPLIT, "val")))
    split = data.splits[split_name]
    model = _model(cfg, len(data.target_names))
    bn = _load_arrays(model, msg.content[P.ARRAYS], context, conf, cfg, len(data.target_names),
                      _bn_folder(context, msg, data.name))
    if bn == "adapted":
        _own_batchnorm(model, data, cfg, device)
    elif cfg.eval.round_batchnorm == "site" and split_name == "val":
        _own_batchnorm(model, data, cfg, device)  # the round's weights, statistics to match
        bn = f"{bn}+site-stats"
    t0 = time.perf_counter()
    scores = predict(model, split.images, device, cfg.model.in_channels,
                     **_meta_input(cfg, data, split_name))
    y = split.y.numpy().copy()
    y[:, ~data.annotated] = float("nan")  # a finding the site does not annotate is not scored
    result = score_site(y, scores, data.target_names)
    metrics = flatten(result)
    metrics["loss"] = masked_bce_np(y, scores)  # the split's loss: flattening shows convergence
    metrics[P.NUM_EXAMPLES] = len(split)
    metrics["seconds"] = time.perf_counter() - t0
    reasons = {**result["reasons"], **scoring.release(metrics, node.min_cell(cfg, context))}
    return egress.reply(msg, metrics, data.name, context, reasons=reasons, batchnorm=bn)


def _evaluate_models(msg: Message, context: Context) -> Message:
    """Score every model in the message on one split (sites/scoring.py has the plan format).

    Mode `thresholds` (validation split): each model's Youden threshold per label. Mode `score`
    (test split): per-model metrics with CIs and ROC points, and paired statistics per pair.
    Each model is scored with the BatchNorm FedBN semantics ask for (see `_load_arrays`).
    """
    cfg = node.experiment(msg, context)
    device = _setup(cfg)
    data = node.site_data(cfg, context, msg)
    plan = scoring.read_plan(str(msg.content[P.CONFIG][P.EVAL_PLAN]))
    split = data.splits[_readable_split(cfg, plan.split)]
    n_out = len(data.target_names)
    model = _model(cfg, n_out)
    if plan.mode == P.EVAL_MODE_BATCHNORM:
        return _batchnorm_stats(msg, context, cfg, data, plan, model, device)
    t0 = time.perf_counter()
    meta = _meta_input(cfg, data, plan.split)
    scores, info = {}, {"name": data.name}
    for spec in plan.models:
        conf = {P.KEEP_LOCAL_BN: spec.local_bn, P.MODEL: spec.name}
        bn = _load_arrays(model, msg.content[P.EVAL_MODEL_PREFIX + spec.name], context, conf, cfg, n_out,
                          _bn_folder(context, msg, data.name))
        if bn == "adapted" or (bn == "own" and cfg.eval.batchnorm == "precise"):
            _own_batchnorm(model, data, cfg, device)  # FedBN: statistics of the final weights
        info[P.EVAL_BATCHNORM_INFO + spec.name] = bn
        scores[spec.name] = (predict(model, split.images, device, cfg.model.in_channels, **meta)
                             if len(split) else np.zeros((0, n_out), dtype=np.float32))
    y = split.y.numpy().copy()
    y[:, ~data.annotated] = float("nan")  # a finding the site does not annotate is not scored
    min_cell = node.min_cell(cfg, context)
    if plan.mode == P.EVAL_MODE_THRESHOLDS:
        metrics, reasons = scoring.val_thresholds(y, scores, data.target_names, min_cell)
    else:
        groups = split.meta["patient_id"].to_numpy() if "patient_id" in split.meta else None
        metrics, reasons = scoring.score_models(y, scores, data.target_names, groups, plan)
        reasons |= scoring.release(metrics, min_cell)
    metrics[P.NUM_EXAMPLES] = len(split)
    metrics["seconds"] = time.perf_counter() - t0
    info |= {f"reason:{k}": v for k, v in reasons.items()}
    content = RecordDict({P.METRICS: MetricRecord(scoring.to_wire(metrics)),
                          P.SITE_INFO: ConfigRecord(info)})
    return egress.send(msg, content, context)


def _batchnorm_stats(msg: Message, context: Context, cfg: ExperimentConfig, data: SiteData,
                     plan: scoring.Plan, model: torch.nn.Module, device: torch.device) -> Message:
    """PreciseBN's site half: each model's BatchNorm statistics under its final weights, from this
    site's train split. Only per-channel means and variances over the whole split leave."""
    t0 = time.perf_counter()
    split = data.splits[_readable_split(cfg, plan.split)]
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
    return egress.send(msg, content, context)
