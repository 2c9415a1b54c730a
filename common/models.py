"""The model zoo: a small CNN for CPUs (seed 003) and torchvision backbones.

Weights come only from a local file the user names (`model.weights`); nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from common.config import ModelConfig
from common.errors import ChestFedError

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Seed 003's design: 4 blocks of (conv3-BN-ReLU) x2 + maxpool + dropout, a 256-wide head.

    A global average pool before the head keeps the parameter count independent of image size.
    """

    def __init__(self, n_out: int, in_channels: int = 1, width: int = 16, dropout: float = 0.25):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for b in range(4):
            c_out = width * 2**b
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                nn.MaxPool2d(2), nn.Dropout(dropout),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in, 256), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(256, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def _torchvision(arch: str, n_out: int, in_channels: int) -> nn.Module:
    import torchvision.models as tvm

    net = getattr(tvm, arch)(weights=None)  # weights=None: never reach for the internet
    if arch.startswith("resnet"):
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        net.fc = nn.Linear(net.fc.in_features, n_out)
    else:  # densenet
        if in_channels != 3:
            net.features.conv0 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        net.classifier = nn.Linear(net.classifier.in_features, n_out)
    return net


def build_model(cfg: ModelConfig, n_out: int) -> nn.Module:
    if cfg.arch == "smallcnn":
        net: nn.Module = SmallCNN(n_out, cfg.in_channels, cfg.width, cfg.dropout)
    else:
        net = _torchvision(cfg.arch, n_out, cfg.in_channels)
    if cfg.norm == "group":  # privacy.dp: BatchNorm -> GroupNorm through Opacus (common/privacy.py)
        from common.privacy import group_norm

        net = group_norm(net)
    if cfg.weights:
        load_local_weights(net, cfg.weights)
    return net


def load_local_weights(net: nn.Module, path: str) -> None:
    """Load a state dict from a local file, keeping layers whose shapes differ (e.g. the head).

    Accepts a raw state dict or a checkpoint with a 'model' / 'state_dict' entry. A 3-channel
    first convolution is averaged to 1 channel when the model takes grayscale input.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ChestFedError(f"model.weights: file '{file}' not found (weights are only read "
                            "from a local file; nothing is downloaded)")
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ChestFedError(f"model.weights: cannot read '{file}': {exc}") from None
    state = blob.get("model", blob.get("state_dict", blob)) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ChestFedError(f"model.weights: '{file}' holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    keep, skipped = {}, []
    for k, v in state.items():
        if k not in own:
            continue
        if v.shape != own[k].shape and v.ndim == 4 and own[k].shape[1] == 1 and v.shape[1] == 3:
            v = v.mean(dim=1, keepdim=True)
        if v.shape == own[k].shape:
            keep[k] = v
        else:
            skipped.append(k)
    if not keep:
        raise ChestFedError(f"model.weights: no tensor in '{file}' matches this model "
                            "(is it for a different architecture?)")
    net.load_state_dict(keep, strict=False)
    log.info("loaded %d tensors from %s (%d kept at their initial values: %s)",
             len(keep), file, len(own) - len(keep), ", ".join(skipped[:5]))


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ChestFedError(f"runtime.device: '{name}' is not a device (use auto, cpu, cuda, cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChestFedError(f"runtime.device: '{name}' asked for, but no CUDA device is available")
    return dev


def is_batchnorm_key(name: str, model: nn.Module) -> bool:
    """True for parameters and buffers of BatchNorm layers (FedBN keeps these at the site)."""
    module_name = name.rsplit(".", 1)[0]
    mod = dict(model.named_modules()).get(module_name)
    return isinstance(mod, nn.modules.batchnorm._BatchNorm)
