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
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from chestfed.common import protocol as P
from chestfed.common import batchnorm
from chestfed.common.config import ExperimentConfig
from chestfed.common.errors import ChestFedError
from chestfed.common.metrics import flatten, score_site
from chestfed.common.models import build_model, pick_device
from chestfed.common.training import masked_bce_np, predict, round_lr, schedule_length, site_seed, train_epochs
from chestfed.common.meta import site_inputs
from chestfed.common.weights import loss_weights
from chestfed.sites import egress, local_state, node, personal, scoring
from chestfed.sites.data import SiteData
from chestfed.sites.worker import assigned_cpus, assigned_gpus, worker_info
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
        # As many torch threads as the worker's CPU share: more oversubscribes the cores.
        cpus = cfg.runtime.cpus_per_site
        if cpus == "auto":  # the share Ray resolved it to; outside Ray (a deployed site) one
            cpus = assigned_cpus() or 1.0
        threads = cfg.runtime.threads_per_site or max(1, int(round(cpus)))
        torch.set_num_threads(threads)
        _THREADS_SET = True
    return pick_device(cfg.runtime.device, assigned_gpus())


def _model(cfg: ExperimentConfig, n_out: int, slot: str = "") -> torch.nn.Module:
    """Built once per process and reused: rounds only load new weights into it. `slot`: a second
    instance (Ditto's personal model trains next to the global one)."""
    key = f"{cfg.model.model_dump_json()}|{n_out}|{slot}"
    if key not in _MODELS:
        _MODELS[key] = build_model(cfg.model.model_copy(update={"weights": None}), n_out)
    return _MODELS[key]


def _fresh_state(cfg: ExperimentConfig, n_out: int) -> dict[str, torch.Tensor]:
    """The experiment's initial weights (seeded as the coordinator seeds its own, so a FedPer
    head a site never trained starts where every site's did)."""
    key = f"fresh|{cfg.model.model_dump_json()}|{n_out}"
    if key not in _FRESH:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            _FRESH[key] = build_model(cfg.model.model_copy(update={"weights": None}), n_out).state_dict()
    return _FRESH[key]


def _state_folder(context: Context, msg: Message, site: str) -> Path | None:
    """Where this site keeps what stays here between rounds (FedBN's BatchNorm, FedPer's head,
    Ditto's personal model) on its own disk (sites/local_state.py)."""
    run = str(msg.content[P.CONFIG].get(P.RUN_NAME, "run"))
    return local_state.folder(node.node_settings(context), node.deployed(context), run, site)


def _load_arrays(model: torch.nn.Module, arrays: ArrayRecord, context: Context, conf: ConfigRecord,
                 cfg: ExperimentConfig, n_out: int, folder: Path | None = None,
                 before_round: int | None = None) -> str:
    """Load the server's weights and put this site's own parts back in (FedBN's BatchNorm,
    FedPer's / FedRep's head: sites/personal.py), as the round before `before_round` left them
    (None: the newest).

    Returns which BatchNorm is in use: 'global', 'own', or 'adapted' (FedBN model scored at a
    site that never trained it: affine at initial values, statistics re-estimated here).
    """
    state = arrays.to_torch_state_dict()
    parts = personal.local_parts(conf, model)
    if not parts:
        model.load_state_dict(state)
        return "global"
    fresh = _fresh_state(cfg, n_out)
    # what the message lacks starts at the initial weights (FedPer's round 1 brings the head)
    full = {k: (state[k] if k in state else fresh[k]) for k in fresh}
    found = set()
    for part in parts:  # training round r starts from round r-1's part; scoring uses the newest
        local = local_state.load(context, folder, part, str(conf.get(P.MODEL, "")), before_round)
        if local is not None:
            full.update(local.to_torch_state_dict())
            found.add(part)
    model.load_state_dict(full)
    if "bn" not in parts:
        return "global"
    return "own" if "bn" in found else "adapted"


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
    if P.RELEASE in conf:  # after the last round: this site's personal model, once
        return _release(msg, context, cfg, data)
    info = {**data.summary(), "n_bad": data.n_bad}
    return egress.reply(msg, info, data.name, context)


def _release(msg: Message, context: Context, cfg: ExperimentConfig, data: SiteData) -> Message:
    """A personalised method's final personal model (sites/personal.py): Ditto's own model, or
    the final shared body with this site's head (FedPer, FedRep)."""
    conf = msg.content[P.CONFIG]
    alias, folder = str(conf.get(P.MODEL, "")), _state_folder(context, msg, data.name)
    if personal.method(conf) in ("ditto", "mrmtl", "apfl"):
        kept = local_state.load(context, folder, "personal", alias, None)
        if kept is None:
            raise ChestFedError("no personal model of this run here (did this site train?)")
        state = kept.to_torch_state_dict()
        if personal.ALPHA_KEY in state:  # APFL: the mixture with the final global model
            alpha = float(state.pop(personal.ALPHA_KEY))
            state = personal.mixed_state(_model(cfg, len(data.target_names)), state,
                                         msg.content[P.ARRAYS].to_torch_state_dict(), alpha)
    else:
        if local_state.load(context, folder, "head", alias, None) is None:
            raise ChestFedError("no personal head of this run here (did this site train?)")
        model = _model(cfg, len(data.target_names))
        _load_arrays(model, msg.content[P.ARRAYS], context, conf, cfg, len(data.target_names), folder)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return egress.reply(msg, {P.NUM_EXAMPLES: len(data.splits["train"])}, data.name, context,
                        ArrayRecord(state))


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = node.experiment(msg, context)
    device = _setup(cfg)
    data = node.site_data(cfg, context, msg)
    conf = msg.content[P.CONFIG]
    n_out = len(data.target_names)
    round_ = int(conf.get(P.ROUND, 0))
    validation = None
    if P.VALIDATE in conf:  # the previous round's validation rides in this reply (before training)
        validation = _score_round(msg, context, cfg, data, device, "val", round_ or None)
    model = _model(cfg, n_out)
    folder = _state_folder(context, msg, data.name)
    alias = str(conf.get(P.MODEL, ""))
    _load_arrays(model, msg.content[P.ARRAYS], context, conf, cfg, n_out, folder, round_ or None)
    method = personal.method(conf)
    mu = float(conf.get(P.PROX_MU, 0.0))
    # FedProx's anchor, Ditto's and MR-MTL's: the model as it arrived this round (MR-MTL: the
    # sites' mean)
    received = personal.proximal_target(model) if mu > 0 or method in ("ditto", "mrmtl") else None
    if method == "mrmtl":  # the site's own model carries on; the mean is only the anchor
        mu = float(conf.get(P.MRMTL_LAMBDA, 0.0))
        kept = local_state.load(context, folder, "personal", alias, round_ or None)
        if kept is not None:
            model.load_state_dict(kept.to_torch_state_dict())
    tr = data.splits["train"]
    weights = loss_weights(cfg.train, tr.y.numpy())  # train.pos_weight / task_weights
    weights |= _meta_input(cfg, data, "train")
    pw = weights.pop("pos_weight", None)
    t0 = time.perf_counter()
    lr = (float(conf[P.LR]) if P.LR in conf  # train.lr_schedule plateau: the coordinator's rate
          else round_lr(cfg.train, int(conf.get(P.ROUND, 0)), int(conf.get(P.LR_ROUNDS, 0)) or schedule_length(cfg)))
    epochs, seed = int(conf.get(P.LOCAL_EPOCHS, 1)), _seed(cfg, conf, data.name)

    def fit(net: torch.nn.Module, n_epochs: int, prox: float, anchor: Any) -> Any:
        return train_epochs(net, tr.images, tr.y, cfg.train, n_epochs, seed, device,
                            cfg.model.in_channels, prox, anchor, pw, lr=lr, **weights)

    privacy_metrics: dict[str, float] = {}
    if cfg.privacy.dp.level == "record":  # DP-SGD with Opacus (sites/privacy.py)

        stats, privacy_metrics = train_record_dp(model, tr, cfg, epochs, seed, device, mu,
                                                 received, pw, lr)
    elif method == "fedrep":  # the head first (body frozen), then the body (head frozen)
        head = personal.local_parts({P.LOCAL_HEAD: True}, model)["head"]
        with personal.training_only(model, head):
            first = fit(model, int(conf.get(P.HEAD_EPOCHS, 1)), 0.0, None)
        with personal.training_only(model, None, but=head):
            stats = personal.add_stats(fit(model, epochs, 0.0, None), first)
    else:
        stats = fit(model, epochs, mu, received)
    if method in ("ditto", "apfl"):  # a second model, trained here and kept here
        own = _model(cfg, n_out, slot="personal")
        kept = local_state.load(context, folder, "personal", alias, round_ or None)
        # its first round starts from the global model (fl4health's Ditto and APFL do the same)
        start = (kept or msg.content[P.ARRAYS]).to_torch_state_dict()
        extra, keep = personal.train_own(method, own, start, model, received, conf,
                                         lambda net, prox, anchor: fit(net, epochs, prox, anchor))
        stats = personal.add_stats(stats, extra)
        local_state.save(context, folder, "personal", alias, round_, ArrayRecord(keep))
    if cfg.privacy.dp.level == "site":  # Flower's DP noise assumes an unweighted mean of sites

        privacy_metrics[UNIT_WEIGHT] = 1.0
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if method == "mrmtl":  # kept for the next round; it is also what the mean is taken of
        local_state.save(context, folder, "personal", alias, round_, ArrayRecord(state))
    # what stays here (FedBN's BatchNorm, FedPer's / FedRep's head) never goes in the reply
    state, kept_parts = personal.split_off(state, personal.local_parts(conf, model))
    for part, arrays in kept_parts.items():
        local_state.save(context, folder, part, alias, round_, ArrayRecord(arrays))
    metrics = {P.NUM_EXAMPLES: len(tr), "train-loss": stats.loss, "images": stats.images,
               "steps": stats.steps, "seconds": time.perf_counter() - t0, "lr": lr,
               **privacy_metrics}
    # simulation: which Ray node and GPUs trained it (metrics.jsonl); {} when deployed
    worker = {} if node.deployed(context) else worker_info()
    return egress.reply(msg, metrics, data.name, context, ArrayRecord(state), worker=worker,
                        validation=validation)


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
    metrics, reasons, bn = _score_round(msg, context, cfg, data, device,
                                        _readable_split(cfg, str(conf.get(P.SPLIT, "val"))))
    return egress.reply(msg, metrics, data.name, context, reasons=reasons, batchnorm=bn)


def _score_round(msg: Message, context: Context, cfg: ExperimentConfig, data: SiteData,
                 device: torch.device, split_name: str, before_round: int | None = None
                 ) -> tuple[dict[str, float], dict[str, str], str]:
    """A round's validation of the received weights on one split: the metrics after the
    disclosure rules, the reasons for what was withheld, and which BatchNorm was used. An
    evaluate message asks for it, or a training message before it trains (P.VALIDATE,
    eval.round_validation with_training: `before_round` is then its round, so this site's own
    parts are those the previous round left, as a separate evaluate message would have found)."""
    conf = msg.content[P.CONFIG]
    split = data.splits[split_name]
    model = _model(cfg, len(data.target_names))
    bn = _load_arrays(model, msg.content[P.ARRAYS], context, conf, cfg, len(data.target_names),
                      _state_folder(context, msg, data.name), before_round)
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
    return metrics, reasons, bn


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
                          _state_folder(context, msg, data.name))
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
