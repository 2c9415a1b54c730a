"""The names both sides use in Flower messages: the only contract between sites/ and server/.

A message's ConfigRecord ("config") carries the part of the resolved experiment config that
*this* site needs, as YAML (`server.site_grid.site_experiment`: its own site entry, the task,
data preprocessing and split settings, model, training, evaluation and privacy settings; no
other site, no cache or output folder, no W&B settings), plus the site's index, the run's name
and the learning-rate schedule's length, so whichever process handles it (a Ray actor in
simulation, a SuperNode in deployment) can act without any state the server did not send.
The coordinator's Grid wrapper (`server.site_grid.SiteGrid`) writes these per destination.
Only the discovery's first message (`HELLO`) carries no experiment: the coordinator does not
know yet which site a node is. Weights travel in the ArrayRecord ("arrays"); numbers come back
in the MetricRecord ("metrics"), after the disclosure rules of common/privacy/disclosure.py. Nothing
else crosses. Each site logs what it sent (keys, dtypes, shapes) in its own `egress.jsonl`.
"""
from __future__ import annotations

import math

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE_INFO = "site"  # ConfigRecord in replies: who answered

# ConfigRecord keys (server -> site)
EXPERIMENT = "chestfed.experiment"  # this site's part of the resolved config, YAML
SITE = "chestfed.site"  # the site this message is for ('pooled': the simulation-only node)
SITE_INDEX = "chestfed.site-index"  # its position in the experiment's site list (seeds)
RUN_NAME = "chestfed.run-name"  # the run folder's name (a site files its split table under it)
LR_ROUNDS = "chestfed.lr-rounds"  # rounds the learning-rate schedule spans (common.training)
LR = "chestfed.lr"  # train.lr_schedule plateau: this round's learning rate (server/coordinator)
HELLO = "chestfed.hello"  # discovery, first message: "which site are you?" (no experiment)
SPLIT = "split"  # 'val' | 'test'
VALIDATE = "chestfed.validate"  # train: first score the received weights on the val split
VALIDATION = "validation"  # ConfigRecord in such a train reply: those numbers (eval.round_validation)
MODEL = "model"  # name of the model being scored (a matrix row)
LOCAL_EPOCHS = "local-epochs"
SEED = "seed"
ROUND = "server-round"  # FedAvg sets this itself
PROX_MU = "proximal-mu"  # FedProx sets this itself
KEEP_LOCAL_BN = "keep-local-bn"  # FedBN: BatchNorm stays at the site
# Personalised methods (server/strategies/ditto.py, fedper.py, fedrep.py; sites/personal.py)
PERSONAL = "chestfed.personal"  # the method: what the site trains and keeps besides the global model
LOCAL_HEAD = "chestfed.local-head"  # fedper / fedrep: the classifier head stays at the site
DITTO_LAMBDA = "chestfed.ditto-lambda"  # ditto: the personal model's pull towards the global one
MRMTL_LAMBDA = "chestfed.mrmtl-lambda"  # mrmtl: each site's model's pull towards the sites' mean
APFL_ALPHA = "chestfed.apfl-alpha"  # apfl: the initial weight of the site's own model
APFL_LEARN_ALPHA = "chestfed.apfl-learn-alpha"  # apfl: whether the site learns it
HEAD_EPOCHS = "chestfed.head-epochs"  # fedrep: epochs on the head (body frozen) before the body's
RELEASE = "chestfed.release"  # query, at the end: send your personal model of MODEL once
POOL_SITES = "pool-sites"  # pooled (simulation only): which sites' train splits to pool
POOLED_NODE = "pooled"  # the simulation-only node that holds pooled data
SECAGG_KEYS = "chestfed.secagg-keys"  # SecAgg+ train: the state-dict keys of the masked arrays, JSON
SECAGG_INNER = "chestfed.secagg-inner"  # set at the site: a reply SecAgg+ masks before it leaves

# The final evaluation (server/evaluation/evaluator.py -> sites/scoring.py): one message per site carries
# every model, each as its own ArrayRecord, and a JSON plan of what to score.
EVAL_MODEL_PREFIX = "model:"  # RecordDict key of each model's ArrayRecord
EVAL_PLAN = "chestfed.eval-plan"  # ConfigRecord key: the plan, JSON
EVAL_MODE_THRESHOLDS = "thresholds"  # val split of a training site: Youden thresholds
EVAL_MODE_SCORE = "score"  # test split: every metric, CIs, ROC points, paired statistics
# Before scoring or saving (server/evaluation/batchnorm.py): each training site re-estimates a model's
# BatchNorm statistics on its train split and returns them, per model, as an ArrayRecord under
# EVAL_MODEL_PREFIX + name, with the image count in MetricRecord key m/<model>/n_images.
EVAL_MODE_BATCHNORM = "batchnorm"
EVAL_MODEL_KEY = "m/"  # MetricRecord keys: m/<model>/<metric path>
EVAL_PAIR_KEY = "p/"  # MetricRecord keys: p/<model a>|<model b>/<metric path>
EVAL_PAIR_SEP = "|"
EVAL_BATCHNORM_INFO = "batchnorm:"  # site-info ConfigRecord prefix: which BatchNorm was used
# site-info keys of a simulated site's training reply (sites/worker.py): its Ray worker's node
# id, the GPU ids Ray gave it (comma-separated, '' for none) and its CUDA_VISIBLE_DEVICES
WORKER_NODE, WORKER_GPUS, WORKER_CUDA = "ray-node", "gpus", "cuda-visible-devices"

# MetricRecord keys (site -> server)
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key


def split_eval_reply(metrics: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """A site's flat final-evaluation reply -> ({model: {path: value}}, {"a|b": {path: value}})."""
    models: dict[str, dict] = {}
    pairs: dict[str, dict] = {}
    for k, v in metrics.items():
        for prefix, dest in ((EVAL_MODEL_KEY, models), (EVAL_PAIR_KEY, pairs)):
            if k.startswith(prefix):
                name, _, path = k[len(prefix):].partition("/")
                dest.setdefault(name, {})[path] = v
    return models, pairs


def clean_metrics(d: dict[str, float]) -> dict[str, float]:
    """MetricRecord values must be numbers; NaN survives the wire, None does not."""
    out = {}
    for k, v in d.items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)):
            out[k] = v
        elif v is None:
            out[k] = math.nan
    return out
