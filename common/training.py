"""The local training step and inference, shared by every strategy and by the pooled baseline."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from chestfed.common.config import ExperimentConfig, TrainConfig
from chestfed.common.errors import ChestFedError


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def site_seed(seed: int, rnd: int, site_index: int) -> int:
    """The training seed of one site in one round: distinct per experiment seed, round and site,
    and the same on every rerun (sites/app.py and bench/overhead.py's plain loop both use it)."""
    return seed * 100_003 + rnd * 1_009 + site_index


def masked_bce(logits: torch.Tensor, target: torch.Tensor,
               pos_weight: torch.Tensor | None = None,
               task_weights: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits over the known labels only: NaN targets give no loss and no gradient.

    Averaged over known entries (not over the batch), so a site that annotates fewer labels
    does not get a smaller effective learning rate. `task_weights` [T] scales each label's loss
    (train.task_weights, common/weights.py).
    """
    known = ~torch.isnan(target)
    safe = torch.where(known, target, torch.zeros_like(target))
    loss = nn.functional.binary_cross_entropy_with_logits(logits, safe, reduction="none",
                                                          pos_weight=pos_weight)
    loss = loss * known
    if task_weights is not None:
        loss = loss * task_weights
    return loss.sum() / known.sum().clamp(min=1)


def masked_bce_np(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """`masked_bce` (unweighted) from probabilities, for scored splits: NaN targets left out."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64).reshape(y.shape), eps, 1 - eps)
    known = ~np.isnan(y)
    if not known.any():
        return float("nan")
    yk, pk = y[known], p[known]
    return float(-(yk * np.log(pk) + (1 - yk) * np.log(1 - pk)).mean())


def inverse_prevalence(y: np.ndarray) -> torch.Tensor:
    """train.pos_weight 'inverse_prevalence': negatives/positives per label (1 where undefined),
    clipped to [0.1, 100]; Neuhaus's exact 1/prevalence is 'reciprocal_prevalence'
    (common/weights.py)."""
    known = ~np.isnan(y)
    pos = np.nansum(y == 1, axis=0)
    neg = (known & (y == 0)).sum(axis=0)
    w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(w, 0.1, 100.0), dtype=torch.float32)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on `device`. For CUDA the batch is pinned so the copy runs asynchronously, and
    images cross the bus as uint8 (a quarter of float32) and are scaled on the GPU."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def to_input(images: torch.Tensor, in_channels: int) -> torch.Tensor:
    """uint8 [B, H, W] -> float [B, C, H, W] scaled to [-1, 1] (fixed, site-independent)."""
    x = images.float().unsqueeze(1).div_(127.5).sub_(1.0)
    return x.expand(-1, in_channels, -1, -1) if in_channels != 1 else x


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Cohen et al.'s augmentation, scaled down: small random rotation, translation and scale."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(b, generator=gen) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * 0.1
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1).to(x)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)


def schedule_length(cfg: ExperimentConfig) -> int:
    """How many rounds a learning-rate schedule spans: the strategy's rounds, or for
    `sequential` its stages (cycles x sites visited per cycle)."""
    if cfg.strategy.name == "sequential":
        seq = cfg.strategy.sequential
        return (seq.cycles or cfg.strategy.rounds) * len(seq.order or cfg.sites)
    return cfg.strategy.rounds


def round_lr(cfg: TrainConfig, round_: int, total: int) -> float:
    """The learning rate of round `round_` (1-based) of `total` under `cfg.lr_schedule`."""
    if cfg.lr_schedule != "cosine" or total <= 1 or round_ < 1:
        return cfg.lr  # 'plateau': the coordinator sends the rate (common/schedules.py)
    progress = min(round_ - 1, total - 1) / total
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Precision:
    """train.precision on one device: the autocast dtype (None: fp32) and, for fp16, a GradScaler
    (torch.amp's own; fp16 gradients underflow without it)."""

    def __init__(self, setting: str, device: torch.device) -> None:
        cuda = device.type == "cuda"
        if setting == "fp16" and not cuda:
            raise ChestFedError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        if setting == "auto":
            setting = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        self.name = setting
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(setting)
        self.scaler = torch.amp.GradScaler(device.type) if setting == "fp16" else None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()


def for_device(model: nn.Module, device: torch.device) -> nn.Module:
    """On CUDA: channels-last weights (every model here is a CNN; cuDNN's fastest convolutions,
    with tensor cores under bf16/fp16, use that layout) and cuDNN's autotuner (the input shape
    is fixed per run). Elsewhere just `.to(device)`."""
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    return model


def _layout(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


@dataclass
class TrainStats:
    loss: float
    images: int
    steps: int


def train_epochs(model: nn.Module, images: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 epochs: int, seed: int, device: torch.device, in_channels: int = 1,
                 proximal_mu: float = 0.0, global_params: list[torch.Tensor] | None = None,
                 pos_weight: torch.Tensor | None = None, lr: float | None = None,
                 task_weights: torch.Tensor | None = None,
                 meta: torch.Tensor | None = None) -> TrainStats:
    """Train in place for `epochs` passes over (images uint8 [N,H,W], y float [N,T] with NaN).

    `proximal_mu` > 0 adds FedProx's (mu/2)||w - w_global||^2 on the client; `lr` overrides
    `cfg.lr` (a round's scheduled rate, see `round_lr`); `task_weights` [T] scale each label's
    loss; `meta` [N, D] are the images' encoded metadata for a fusion model (common/meta.py).
    """
    gen = seed_everything(seed)
    for_device(model, device).train()
    amp = Precision(cfg.precision, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr if lr is None else lr,
                           weight_decay=cfg.weight_decay)
    pw = pos_weight.to(device) if pos_weight is not None else None
    tw = task_weights.to(device) if task_weights is not None else None
    n = len(images)
    total, steps, seen = 0.0, 0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b, start in enumerate(range(0, n, cfg.batch_size)):
            if cfg.max_batches is not None and b >= cfg.max_batches:
                break
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on a single image
                continue
            x = to_input(to_device(images[idx], device), in_channels)
            if cfg.augment:  # the whole batch at once, on the device (one grid_sample)
                x = augment(x, gen)
            t = to_device(y[idx], device)
            with amp.autocast():
                logits = (model(_layout(x)) if meta is None
                          else model(_layout(x), to_device(meta[idx], device)))
            logits = logits.float()
            loss = masked_bce(logits, t, pw) if tw is None else masked_bce(logits, t, pw, tw)
            if proximal_mu > 0 and global_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params))
                loss = loss + proximal_mu / 2 * prox
            opt.zero_grad(set_to_none=True)
            amp.step(loss, opt)
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
    return TrainStats(loss=total / max(seen, 1), images=seen, steps=steps)


# Images per forward pass when scoring. Small enough that a batch's activations stay well under
# the training step's (smallcnn at 64 px: 256 images peaked ~155 MB above 64; DenseNet-121 at
# 224 px is ~12x that per image), large enough to keep a CPU or GPU busy.
SCORING_BATCH = 64


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, device: torch.device, in_channels: int = 1,
            batch_size: int = SCORING_BATCH, meta: torch.Tensor | None = None) -> np.ndarray:
    """Sigmoid scores [N, T] for uint8 images [N, H, W] (and their metadata [N, D] for a fusion
    model, common/meta.py)."""
    for_device(model, device).eval()
    out = []
    for start in range(0, len(images), batch_size):  # fp32: scores feed AUROCs and thresholds
        x = to_input(to_device(images[start:start + batch_size], device), in_channels)
        logits = (model(_layout(x)) if meta is None
                  else model(_layout(x), to_device(meta[start:start + batch_size], device)))
        out.append(torch.sigmoid(logits).float().cpu())
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()
