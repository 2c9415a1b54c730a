"""The site's half of the personalised methods: which parts of a model stay here, and the
personal model a site releases once, at the end of training.

- fedbn (`KEEP_LOCAL_BN`): BatchNorm layers stay (part `bn`);
- fedper / fedrep / fenda (`LOCAL_HEAD`): the classifier head stays (part `head`,
  common.models.head_keys; FENDA-FL's is its local extractor and classifier); the body is what
  the coordinator averages (FENDA-FL's global extractor);
- ditto (`PERSONAL: ditto`): a whole personal model is trained here next to the global one and
  stays (part `personal`); only the global model goes back;
- mrmtl (`PERSONAL: mrmtl`): the site's own model carries on from round to round (part
  `personal`); the received mean of the sites' models is only its proximal anchor;
- apfl (`PERSONAL: apfl`): a local model v and a mixing weight alpha stay (part `personal`);
  the personal model is the mixture alpha v + (1 - alpha) w with the global model (`Mixture`).

The parts are kept by sites/local_state.py (memory and the site's own disk, by round), so a
resumed run continues from them. A training reply never carries them; the release (one query
message, `RELEASE`, after the last round) sends each site's personal model once, as the final
weights of `local-<site>` leave a site, so it can be scored at the other sites too.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from chestfed.common import protocol as P
from chestfed.common.models import batchnorm_state_keys, head_keys
from chestfed.common.training import TrainStats


def local_parts(conf: Mapping[str, Any], model: nn.Module) -> dict[str, frozenset[str]]:
    """part -> the state-dict keys of `model` that stay at this site under the message's method."""
    parts: dict[str, frozenset[str]] = {}
    if bool(conf.get(P.KEEP_LOCAL_BN, False)):
        parts["bn"] = batchnorm_state_keys(model)
    if bool(conf.get(P.LOCAL_HEAD, False)):
        parts["head"] = head_keys(model)
    return parts


def split_off(state: dict[str, torch.Tensor], parts: Mapping[str, frozenset[str]]
              ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """(what may leave the site, {part: what stays})."""
    kept = {part: {k: v for k, v in state.items() if k in keys} for part, keys in parts.items()}
    local = set().union(*parts.values()) if parts else set()
    return {k: v for k, v in state.items() if k not in local}, kept


def method(conf: Mapping[str, Any]) -> str:
    return str(conf.get(P.PERSONAL, ""))


def proximal_target(model: nn.Module) -> list[torch.Tensor]:
    """The received global model's parameters, in `model.parameters()` order: Ditto's personal
    model is pulled towards them (lambda/2 ||v - w||^2, Li et al. 2021, Eq. 2)."""
    return [p.detach().clone() for p in model.parameters()]


@contextmanager
def training_only(model: nn.Module, only: frozenset[str] | None = None,
                  but: frozenset[str] | None = None) -> Iterator[None]:
    """Freeze every parameter except those in `only` (or: those in `but`) for the block
    (FedRep's head phase, then its body phase); the model's own flags come back after (a
    site's model is reused between messages, and model.freeze may have frozen some)."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        free = (n in only) if only is not None else (but is None or n not in but)
        p.requires_grad_(flags[n] and free)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def add_stats(main: TrainStats, extra: TrainStats) -> TrainStats:
    """Two trainings in one round (Ditto's personal model, FedRep's head phase) count as the
    compute they are (results.json budget); the reported loss is `main`'s."""
    return TrainStats(loss=main.loss, images=main.images + extra.images,
                      steps=main.steps + extra.steps)


class Mixture(nn.Module):
    """APFL's personal model (Deng, Kamani, Mahdavi 2020, Eq. 3): v_bar = alpha v + (1 - alpha) w,
    one network whose weights mix the site's own model v (`local`) with the global model w.
    Training it moves v and, when learned, alpha (projected onto [0, 1]); w is fixed: the site's
    copy of the global model after this round's own step. Buffers (BatchNorm statistics) are
    v's, estimated under the mixture's forward pass."""

    def __init__(self, local: nn.Module, global_params: Mapping[str, torch.Tensor], alpha: float,
                 learn_alpha: bool):
        super().__init__()
        self.local = local
        self.alpha = nn.Parameter(torch.tensor(float(alpha)), requires_grad=learn_alpha)
        self._w = {k: v.detach() for k, v in global_params.items()}

    def weight(self) -> torch.Tensor:
        return self.alpha.clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        a = self.weight()
        w = {k: (t if t.device == x.device else t.to(x.device)) for k, t in self._w.items()}
        self._w = w  # moved once
        state = {n: a * p + (1 - a) * w[n] for n, p in self.local.named_parameters()}
        state |= dict(self.local.named_buffers())  # updated in place in train mode
        args = (x,) if meta is None else (x, meta)
        return torch.func.functional_call(self.local, state, args)


def mixed_state(local: nn.Module, local_state: Mapping[str, torch.Tensor],
                global_state: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """APFL's released personal model: alpha v + (1 - alpha) w on the weights, v's buffers."""
    params = {n for n, _ in local.named_parameters()}
    return {k: (alpha * v + (1 - alpha) * global_state[k] if k in params else v)
            for k, v in local_state.items()}


ALPHA_KEY = "apfl.alpha"  # APFL's alpha, kept with v in the site's `personal` part


def train_own(method: str, own: nn.Module, start: dict[str, torch.Tensor], global_model: nn.Module,
              received: list[torch.Tensor] | None, conf: Mapping[str, Any],
              fit: Callable[[nn.Module, float, Any], TrainStats]
              ) -> tuple[TrainStats, dict[str, torch.Tensor]]:
    """The second model a site trains after the global one, on the same data and batches;
    returns its training stats and what the site keeps of it (part `personal`).

    ditto: the personal model v from `start`, on its loss + lambda/2 ||v - w_received||^2
    (`received`: the global model's parameters as they arrived). apfl: the local model v and
    alpha from `start` (alpha under ALPHA_KEY, else the configured initial value), trained
    through the mixture alpha v + (1 - alpha) w with w = `global_model` after this round's
    own step (Deng et al. 2020, Algorithm 1)."""
    start = dict(start)
    if method == "ditto":
        own.load_state_dict(start)
        stats = fit(own, float(conf.get(P.DITTO_LAMBDA, 0.0)), received)
        return stats, {k: v.detach().cpu() for k, v in own.state_dict().items()}
    alpha = float(start.pop(ALPHA_KEY, conf.get(P.APFL_ALPHA, 0.5)))
    own.load_state_dict(start)
    mix = Mixture(own, dict(global_model.named_parameters()), alpha,
                  bool(conf.get(P.APFL_LEARN_ALPHA, True)))
    stats = fit(mix, 0.0, None)
    keep = {k: v.detach().cpu() for k, v in own.state_dict().items()}
    keep[ALPHA_KEY] = mix.weight().detach().cpu().reshape(1)
    return stats, keep
