"""DP-SGD at a site with Opacus (`privacy.dp.level: record`; the rules and the accounting are in
common/privacy/__init__.py): BatchNorm swapped for GroupNorm, per-image clipping and Gaussian noise by
Opacus' PrivacyEngine with Poisson sampling.

Opacus is imported only where it is used: a run without DP never loads it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chestfed.common.training import augment, seed_everything, to_device, to_input


def group_norm(model: nn.Module) -> nn.Module:
    """Every BatchNorm replaced by GroupNorm through Opacus' own validator (ModuleValidator.fix),
    the replacement Opacus' tutorials use for DP-SGD."""
    from opacus.validators import ModuleValidator  # lazy: opacus loads only when this runs

    net = ModuleValidator.fix(model)
    for m in net.modules():  # Opacus' backward hooks cannot follow an in-place activation
        if hasattr(m, "inplace") and isinstance(m, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU)):
            m.inplace = False
    return net


@dataclass
class DPStats:
    loss: float
    images: int
    steps: int
    sample_rate: float


def per_image_masked_bce(logits: torch.Tensor, target: torch.Tensor,
                         pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The masked BCE of common.training, averaged per image first and then over the batch:
    Opacus' `loss_reduction="mean"` undoes a mean over the batch dimension to get each image's
    own gradient, so the loss must be a mean over images (an image with no known label adds 0)."""
    known = ~torch.isnan(target)
    safe = torch.where(known, target, torch.zeros_like(target))
    loss = nn.functional.binary_cross_entropy_with_logits(logits, safe, reduction="none",
                                                          pos_weight=pos_weight) * known
    per_image = loss.sum(1) / known.sum(1).clamp(min=1)
    return per_image.mean() if len(per_image) else loss.sum()


def train_epochs_dp(model: nn.Module, images: torch.Tensor, y: torch.Tensor, train_cfg: Any,
                    epochs: int, seed: int, device: torch.device, noise_multiplier: float,
                    max_grad_norm: float, in_channels: int = 1, proximal_mu: float = 0.0,
                    global_params: list[torch.Tensor] | None = None,
                    pos_weight: torch.Tensor | None = None, lr: float | None = None) -> DPStats:
    """DP-SGD with Opacus for `epochs` passes (in expectation: Poisson sampling at rate
    batch_size / N, `1/rate` steps per pass), in place on `model` (a GroupNorm model).

    The same optimiser, loss, augmentation and FedProx term as common.training.train_epochs
    (the loss averaged per image first: `per_image_masked_bce`). Images are not shuffled by
    epoch: Poisson sampling draws every batch afresh.
    """
    from opacus import PrivacyEngine  # lazy: opacus loads only when this runs

    gen = seed_everything(seed)
    model.to(device).train()
    n = len(images)
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg.lr if lr is None else lr,
                           weight_decay=train_cfg.weight_decay)
    if not isinstance(images, torch.Tensor):  # a memory-mapped split (sites/cache.CacheView):
        images = images.tensor()  # Opacus' Poisson sampler wants a Dataset it can index freely
    loader = DataLoader(TensorDataset(images, y), batch_size=min(train_cfg.batch_size, n),
                        generator=gen)
    with warnings.catch_warnings():  # "secure RNG turned off": the seeded generator is on purpose
        warnings.simplefilter("ignore", UserWarning)
        engine = PrivacyEngine(accountant="rdp")
    noise_gen = torch.Generator(device=device).manual_seed(seed) if device.type == "cuda" else \
        torch.Generator().manual_seed(seed)
    private, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                               noise_multiplier=noise_multiplier,
                                               max_grad_norm=max_grad_norm,
                                               poisson_sampling=True, noise_generator=noise_gen)
    rate = float(loader.sample_rate)
    pw = pos_weight.to(device) if pos_weight is not None else None
    total, steps, seen = 0.0, 0, 0
    try:
        for _ in range(epochs):
            for b, (xb, yb) in enumerate(loader):
                if train_cfg.max_batches is not None and b >= train_cfg.max_batches:
                    break
                x = to_input(to_device(xb, device), in_channels)
                if train_cfg.augment and len(x):
                    x = augment(x, gen)
                t = to_device(yb, device)
                loss = per_image_masked_bce(private(x), t, pw)
                opt.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # Opacus' hooks fire on outputs: expected
                    warnings.filterwarnings("ignore", message="Full backward hook")
                    loss.backward()
                # Opacus clips each image's gradient and adds the noise (an empty Poisson batch
                # still gets its noise and counts as a step)
                if opt.pre_step():
                    if proximal_mu > 0 and global_params is not None:
                        # FedProx's mu (w - w_global): a function of the weights alone, added
                        # after the noise (per-image gradients never contain it)
                        with torch.no_grad():
                            for p, g in zip(model.parameters(), global_params):
                                if p.grad is not None:
                                    p.grad.add_(p - g.to(p.device), alpha=proximal_mu)
                    opt.original_optimizer.step()
                total += float(loss.detach()) * len(xb)
                seen += len(xb)
                steps += 1
    finally:
        # Hand the plain module back: Opacus' hooks must not stay on the model the site reuses.
        private._close()
    return DPStats(loss=total / max(seen, 1), images=seen, steps=steps, sample_rate=rate)


def per_sample_grad_norms(model: nn.Module, images: torch.Tensor, y: torch.Tensor,
                          in_channels: int = 1) -> np.ndarray:
    """Each image's gradient norm (Opacus' GradSampleModule), before clipping: for tests and for
    choosing max_grad_norm."""
    from opacus import GradSampleModule  # lazy: opacus loads only when this runs

    gsm = GradSampleModule(model)
    gsm.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook")
        per_image_masked_bce(gsm(to_input(images, in_channels)), y).backward()
    norms = torch.stack([p.grad_sample.reshape(len(images), -1).norm(dim=1)
                         for p in gsm.parameters() if p.requires_grad and p.grad_sample is not None])
    out = norms.pow(2).sum(0).sqrt().detach().numpy()
    gsm._close()
    return out
