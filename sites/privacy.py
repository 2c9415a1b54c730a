"""A site's side of privacy: DP-SGD training (record level) and the Flower mods that clip the
site's update (site level, mode client) or mask it (SecAgg+).

Each mod acts only on a message that asks for it (the key its server-side partner writes), so
one ClientApp serves every configuration, in simulation and in a deployment alike.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import Context, Message

from chestfed.common.privacy import dp_sgd
from chestfed.common import privacy as dp
from chestfed.common.config import ExperimentConfig
from chestfed.common import protocol as P
from chestfed.common.errors import ChestFedError
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.app import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
import numpy as np


def train_record_dp(model: torch.nn.Module, train: Any, cfg: ExperimentConfig, epochs: int,
                    seed: int, device: torch.device, mu: float, global_params: Any,
                    pos_weight: Any, lr: float) -> tuple[Any, dict[str, float]]:
    """DP-SGD on this site's train split; returns the training stats and what the coordinator
    needs to account for it (the settings, sampling rate and steps: no image-level number),
    plus k, the largest number of images one patient has here (for the group-privacy bound)."""
    s = dp_sgd.train_epochs_dp(model, train.images, train.y, cfg.train, epochs, seed, device,
                           cfg.privacy.dp.noise_multiplier, cfg.privacy.dp.max_grad_norm,
                           cfg.model.in_channels, mu, global_params, pos_weight, lr=lr)
    return s, {dp.DP_STEPS: s.steps, dp.DP_SAMPLE_RATE: s.sample_rate,
               dp.DP_NOISE: cfg.privacy.dp.noise_multiplier, dp.DP_N: len(train),
               dp.DP_MAX_PER_PATIENT: dp.max_images_per_patient(train.meta)}


def site_dp_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Site-level DP, mode client: Flower's own fixedclipping_mod / adaptiveclipping_mod clip
    this site's update before it leaves, when the coordinator's
    DifferentialPrivacyClientSide{Fixed,Adaptive}Clipping asked for it (its `clipping_norm`
    key in the train config); every other message passes untouched."""

    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, ctxt)
    confs = list(msg.content.config_records.values())
    if len(confs) != 1 or KEY_CLIPPING_NORM not in confs[0]:
        return call_next(msg, ctxt)

    adaptive = bool(confs[0].get(dp.ADAPTIVE_KEY, False))
    return (adaptiveclipping_mod if adaptive else fixedclipping_mod)(msg, ctxt, call_next)


def secagg_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """SecAgg+ at the site: Flower's own secaggplus_mod runs the protocol's four stages for a
    train message of the coordinator's SecAggPlusWorkflow (server/privacy/secagg.py); at the
    stage that trains, `_train_for_secagg` hands it this site's update. What finally leaves
    (keys, shared-key ciphertexts, the masked update) is what the egress log describes. Every
    other message passes untouched."""

    if (msg.metadata.message_type != MessageType.TRAIN or not msg.has_content()
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, ctxt)

    from chestfed.sites.egress import log_egress  # lazy: brings in PIL, pandas, sklearn

    conf = msg.content.get(P.CONFIG)
    site = str(conf.get(P.SITE, "")) if conf is not None else ""
    out = secaggplus_mod(msg, ctxt, lambda m, c: _train_for_secagg(m, c, call_next))
    log_egress(out, ctxt, site)
    return out


def _train_for_secagg(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """The workflow's train instruction (Flower's legacy FitIns: `fitins.parameters`, an ordered
    list of float arrays) -> this app's train message -> its reply as Flower's legacy FitRes,
    whose parameters are the *update* (new - received weights: small, inside SecAgg+'s clipping
    range) and whose metrics are the counts only (no training loss: it is not masked)."""


    conf = dict(msg.content[P.CONFIG].items())
    keys = json.loads(str(conf[P.SECAGG_KEYS]))
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    received = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(received):
        raise ChestFedError(f"SecAgg+: {len(received)} arrays received for {len(keys)} keys")
    conf[P.SECAGG_INNER] = True  # the app's own egress log skips it: this reply does not leave
    msg.content = RecordDict({P.CONFIG: ConfigRecord(conf),
                              P.ARRAYS: ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(keys, received)})})
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    new = {k: a.numpy() for k, a in out.content[P.ARRAYS].items()}
    update = [new[k].astype(np.float64) - r.astype(np.float64) for k, r in zip(keys, received)]
    limit = float(ctxt.state.config_records[RECORD_KEY_STATE].get("clipping_range", 8.0))
    worst = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
    if worst > limit:
        raise ChestFedError(f"SecAgg+: an entry of this site's update is {worst:.3g}, outside the "
                            f"protocol's clipping range +-{limit:g}; lower train.lr")
    metrics = dict(out.content[P.METRICS].items())
    n = int(metrics.pop(P.NUM_EXAMPLES))
    metrics.pop("train-loss", None)  # the loss is not masked: it stays at the site
    res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(update),
                 num_examples=n, metrics={k: v for k, v in metrics.items()})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
