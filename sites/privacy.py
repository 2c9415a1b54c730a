"""A site's side of privacy: DP-SGD training (record level) and the Flower mods that clip the
site's update (site level, mode client) or mask it (SecAgg+).

Each mod acts only on a message that asks for it (the key its server-side partner writes), so
one ClientApp serves every configuration, in simulation and in a deployment alike.
"""
from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context, Message

from common import privacy as dp
from common.config import ExperimentConfig


def train_record_dp(model: torch.nn.Module, train: Any, cfg: ExperimentConfig, epochs: int,
                    seed: int, device: torch.device, mu: float, global_params: Any,
                    pos_weight: Any, lr: float) -> tuple[Any, dict[str, float]]:
    """DP-SGD on this site's train split; returns the training stats and what the coordinator
    needs to account for it (the settings, sampling rate and steps: no image-level number),
    plus k, the largest number of images one patient has here (for the group-privacy bound)."""
    s = dp.train_epochs_dp(model, train.images, train.y, cfg.train, epochs, seed, device,
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
    from flwr.app import MessageType
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
        return call_next(msg, ctxt)
    confs = list(msg.content.config_records.values())
    if len(confs) != 1 or KEY_CLIPPING_NORM not in confs[0]:
        return call_next(msg, ctxt)
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    adaptive = bool(confs[0].get(ADAPTIVE_KEY, False))
    return (adaptiveclipping_mod if adaptive else fixedclipping_mod)(msg, ctxt, call_next)


ADAPTIVE_KEY = "chestfed.dp-adaptive"  # server -> site: the adaptive wrapper is in use
