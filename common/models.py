"""The model zoo: a small CNN for CPUs (Neuhaus) and torchvision backbones.

Weights come only from a local file the user names (`model.weights`); nothing is downloaded.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from chestfed.common.config import ModelConfig
from chestfed.common.errors import ChestFedError
from chestfed.common.model_files import weights_file
from chestfed.common.privacy.dp_sgd import group_norm

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Neuhaus's design: 4 blocks of (conv3-BN-ReLU) x2 + maxpool + dropout, a 256-wide head.

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


def _resnet_variant(arch: str) -> nn.Module:
    """Baltruschat et al.'s ResNets (2019), from torchvision's ResNet and Bottleneck:
    - resnet38: ResNet-50 with conv2_x, conv3_x, conv4_x reduced to 2, 2, 3 bottleneck blocks
      (layers [2, 2, 3, 3], as the paper describes; that is 32 weighted layers, the paper's
      name notwithstanding);
    - resnet50_large: ResNet-50 with one extra max-pool (3x3, stride 2, padding 1, like the
      stem's) after the first bottleneck stage, so a 448 px input reaches the deeper stages at
      the sizes a 224 px one does. Its parameters (and their names) are ResNet-50's, so ResNet-50
      weights load into it;
    - resnet101: torchvision's ResNet-101."""
    import torchvision.models as tvm  # lazy: torchvision loads only when this runs
    from torchvision.models.resnet import Bottleneck, ResNet  # lazy: torchvision loads only when this runs

    if arch == "resnet38":
        return ResNet(Bottleneck, [2, 2, 3, 3])
    if arch == "resnet50_large":
        net = tvm.resnet50(weights=None)
        net.layer1 = nn.Sequential(*net.layer1, nn.MaxPool2d(3, 2, 1))  # keeps layer1.0.. names
        return net
    return tvm.resnet101(weights=None)


def _torchvision(arch: str, n_out: int, in_channels: int) -> nn.Module:
    import torchvision.models as tvm  # lazy: torchvision loads only when this runs

    if arch in ("resnet38", "resnet50_large", "resnet101"):
        net = _resnet_variant(arch)
    else:
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


def _classifier_name(net: nn.Module) -> str:
    """The attribute path of a built network's last linear layer (the classifier)."""
    if isinstance(net, SmallCNN):
        return f"head.{len(net.head) - 1}"
    return "fc" if hasattr(net, "fc") else "classifier"


class MetaFusion(nn.Module):
    """Image features and patient metadata (common/meta.py) fused before the classifier.

    The image network's classifier becomes the identity, so `image` yields its features (SmallCNN:
    the 256-wide layer; ResNet / DenseNet: the pooled features). The metadata go through a dense
    layer of `hidden` units with ReLU (Neuhaus's 32 extra neurons) or, with hidden 0, as they
    are (Baltruschat et al.'s concatenation), and one linear classifier reads both.
    `forward(x)` without metadata treats every field as missing (BatchNorm re-estimation and
    saliency maps call it so; the metadata never reach a BatchNorm layer)."""

    def __init__(self, image: nn.Module, n_features: int, missing_row: torch.Tensor, n_out: int,
                 hidden: int = 32):
        super().__init__()
        self.image = image
        n_meta = len(missing_row)
        self.meta = nn.Sequential(nn.Linear(n_meta, hidden), nn.ReLU(inplace=True)) if hidden \
            else nn.Identity()
        self.classifier = nn.Linear(n_features + (hidden or n_meta), n_out)
        self.register_buffer("missing_row", missing_row.float(), persistent=False)

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        if meta is None:
            meta = self.missing_row.expand(x.shape[0], -1)
        return self.classifier(torch.cat([self.image(x), self.meta(meta.to(x.dtype))], dim=1))


class Fenda(nn.Module):
    """FENDA-FL's network (Tavakoli et al. 2024, "FENDA-FL: Personalized Federated Learning on
    Heterogeneous Clinical Datasets"; fl4health's FendaModel with FendaJoinMode.CONCATENATE): a
    local and a global feature extractor, two copies of the image network with its classifier
    removed, whose features are concatenated before one linear classifier. Under strategy fenda
    the global extractor (`shared.`) is federated; the local extractor (`local.`) and the
    classifier stay at the site (`head_keys`)."""

    def __init__(self, local: nn.Module, shared: nn.Module, n_features: int, n_out: int):
        super().__init__()
        self.local, self.shared = local, shared
        self.classifier = nn.Linear(2 * n_features, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([self.local(x), self.shared(x)], dim=1))


def _extractor(net: nn.Module) -> tuple[nn.Module, int]:
    """`net` with its classifier replaced by the identity, and the width of what it yields."""
    parent_name, _, leaf = _classifier_name(net).rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    n_features = getattr(parent, leaf).in_features
    setattr(parent, leaf, nn.Identity())
    return net, n_features


def _fuse(net: nn.Module, cfg: ModelConfig, n_out: int) -> MetaFusion:
    from chestfed.common import meta as meta_fields  # lazy: brings in pandas

    net, n_features = _extractor(net)
    missing = torch.from_numpy(meta_fields.all_missing(cfg.meta))
    return MetaFusion(net, n_features, missing, n_out, cfg.meta_hidden)


def trainable_names(net: nn.Module) -> list[str]:
    """model.freeze: backbone keeps these parameters trainable: the classifier (the last linear
    layer) and, in a fusion model, the metadata layer."""
    if isinstance(net, MetaFusion):
        prefixes = ("classifier.", "meta.")
    elif isinstance(net, Fenda):
        prefixes = ("classifier.",)
    else:
        prefixes = (_classifier_name(net) + ".",)
    return [n for n, _ in net.named_parameters() if n.startswith(prefixes)]


def _image_net(cfg: ModelConfig, n_out: int) -> nn.Module:
    if cfg.arch == "smallcnn":
        net: nn.Module = SmallCNN(n_out, cfg.in_channels, cfg.width, cfg.dropout)
    else:
        net = _torchvision(cfg.arch, n_out, cfg.in_channels)
    if cfg.norm == "group":  # privacy.dp: BatchNorm -> GroupNorm through Opacus (common/privacy/dp_sgd.py)

        net = group_norm(net)
    if cfg.weights:  # before fusion: a file's tensor names are the plain network's
        load_local_weights(net, cfg.weights)
    return net


def build_model(cfg: ModelConfig, n_out: int) -> nn.Module:
    if cfg.structure == "fenda":  # strategy fenda: two extractors (each from model.weights, if named)
        local, n_features = _extractor(_image_net(cfg, n_out))
        shared, _ = _extractor(_image_net(cfg, n_out))
        return Fenda(local, shared, n_features, n_out)
    net = _image_net(cfg, n_out)
    if cfg.meta:
        net = _fuse(net, cfg, n_out)
    # Baltruschat et al.'s off-the-shelf: the backbone is a fixed extractor
    if cfg.freeze == "backbone":
        keep = set(trainable_names(net))
        for name, p in net.named_parameters():
            p.requires_grad_(name in keep)
    return net


def load_local_weights(net: nn.Module, path: str) -> None:
    """Load a state dict from a local file, keeping layers whose shapes differ (e.g. the head).

    Accepts a raw state dict or a checkpoint with a 'model' / 'state_dict' entry. A 3-channel
    first convolution is averaged to 1 channel when the model takes grayscale input.
    """
    file = weights_file(path)
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


def pick_device(name: str = "auto", assigned_gpus: list[str] | None = None) -> torch.device:
    """`assigned_gpus`: the GPU ids a Ray worker was given (None outside Ray). 'auto' in a worker
    uses its assignment only: CUDA_VISIBLE_DEVICES maps it to cuda:0, and a 0-GPU worker (or one
    given a GPU that Ray was told about but CUDA cannot open) trains on the CPU."""
    if name == "auto":
        if assigned_gpus is not None and not assigned_gpus:
            return torch.device("cpu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ChestFedError(f"runtime.device: '{name}' is not a device (use auto, cpu, cuda, cuda:0)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ChestFedError(f"runtime.device: '{name}' asked for, but no CUDA device is available")
    return dev


def head_keys(net: nn.Module) -> frozenset[str]:
    """The state-dict keys of a built network's classifier head (the last linear layer and, in a
    fusion model, the metadata layer): what FedPer and FedRep keep at each site."""
    prefixes = tuple({n.rsplit(".", 1)[0] + "." for n in trainable_names(net)})
    if isinstance(net, Fenda):  # FENDA-FL: the local extractor stays at the site with the classifier
        prefixes += ("local.",)
    return frozenset(k for k in net.state_dict() if k.startswith(prefixes))


def batchnorm_keys(cfg: ModelConfig, n_outputs: int) -> frozenset[str]:
    """The state-dict keys of the BatchNorm layers of the model `cfg` builds (FedBN's local part)."""
    return batchnorm_state_keys(build_model(cfg.model_copy(update={"weights": None}), n_outputs))


def batchnorm_state_keys(net: nn.Module) -> frozenset[str]:
    """The state-dict keys of a built network's BatchNorm layers (the module map built once,
    not per key: a site asks this on every FedBN message)."""
    bn = {name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return frozenset(k for k in net.state_dict() if k.rsplit(".", 1)[0] in bn)


def is_batchnorm_key(name: str, model: nn.Module) -> bool:
    """True for parameters and buffers of BatchNorm layers (FedBN keeps these at the site)."""
    module_name = name.rsplit(".", 1)[0]
    mod = dict(model.named_modules()).get(module_name)
    return isinstance(mod, nn.modules.batchnorm._BatchNorm)
