"""BatchNorm statistics that match the weights they are scored with (PreciseBN).

During training a BatchNorm layer keeps exponential running averages of batch statistics, and
those lag the weights: after a short run they describe weights from several steps back, and
FedAvg even averages running statistics that sites computed under different weights. Wu &
Johnson ("Rethinking 'Batch' in BatchNorm", 2021) recommend re-estimating them with the final
weights before a model is evaluated (PreciseBN). Here:

- `reestimate(model, images, ...)`: one pass of the model's own training images through the
  network with BatchNorm in train mode, by `torch.optim.swa_utils.update_bn` (a cumulative
  average, so every batch counts equally), at the training batch size, dropout off as when the
  model is scored;
- `running_stats(model)`: the layers' `running_mean` / `running_var` buffers (aggregates over a
  whole split: one number per channel, nothing about any single image);
- `combine(parts)`: several sites' statistics of the same weights pooled by image count, the
  variance including the between-site term, i.e. what one pass over the union would give.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from chestfed.common.training import to_device, to_input

MEAN, VAR = ".running_mean", ".running_var"


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _batches(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
             in_channels: int) -> Iterator[torch.Tensor]:
    # update_bn puts the whole model in train mode before it asks for the first batch; dropout
    # goes back to eval here, so the statistics describe what each layer sees when the model is
    # scored (and the pass is deterministic).
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    n = len(images)
    for start in range(0, n, batch_size):
        if n - start < 2 <= n:  # a single-image batch has no batch statistics to give
            break
        yield to_input(to_device(images[start:start + batch_size], device), in_channels)


def reestimate(model: nn.Module, images: torch.Tensor, device: torch.device, in_channels: int = 1,
               batch_size: int = 32) -> int:
    """Replace the model's BatchNorm running statistics with those of `images` (uint8 [N, H, W])
    under the current weights. Returns the number of images used (0: nothing changed)."""
    if not has_batchnorm(model) or len(images) < 2:
        return 0
    batch_size = max(2, batch_size)
    model.to(device)
    update_bn(_batches(model, images, batch_size, device, in_channels), model)
    model.eval()
    dropped = 1 if len(images) % batch_size == 1 else 0  # the lone last image (see _batches)
    return len(images) - dropped


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm layers' running mean and variance, by state-dict key."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k.endswith((MEAN, VAR))}


def combine(parts: Iterable[tuple[int, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Pool per-site statistics of one model, weighted by each site's image count.

    mean = sum n_i mu_i / N;  var = sum n_i (var_i + (mu_i - mean)^2) / N  (law of total
    variance: the within-site variances plus the spread of the site means).
    """
    parts = [(int(n), dict(s)) for n, s in parts if int(n) > 0]
    if not parts:
        raise ValueError("no statistics to combine")
    total = sum(n for n, _ in parts)
    out: dict[str, torch.Tensor] = {}
    for key in parts[0][1]:
        if not key.endswith(MEAN):
            continue
        layer = key[: -len(MEAN)]
        means = [(n, s[key].double()) for n, s in parts]
        mean = sum(n * m for n, m in means) / total
        var = sum(n * (s[layer + VAR].double() + (s[key].double() - mean) ** 2)
                  for n, s in parts) / total
        out[key] = mean.to(parts[0][1][key].dtype)
        out[layer + VAR] = var.to(parts[0][1][layer + VAR].dtype)
    return out
