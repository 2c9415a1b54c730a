"""PreciseBN at the coordinator: every model's BatchNorm statistics re-estimated with its final
weights on its own training sites' data, before it is saved or scored.

One EVALUATE message per training site carries every model that site helped train (plan mode
`batchnorm`, split `train`; sites/app.py answers with each model's per-channel running means and
variances and its image count). A model trained at one site takes that site's statistics; a
pooled, federated or sequential model takes its training sites' statistics combined by image
count (common/batchnorm.combine: the variance includes the between-site term), which is what one
pass over the union of their train splits would give. A test site never adapts a model it did
not train. FedBN models keep their BatchNorm at the sites, where it is re-estimated the same way
just before scoring (sites/app.py). Each model's `meta["batchnorm"]` says what was done.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from chestfed.common import batchnorm
from chestfed.common import protocol as P
from chestfed.server.evaluation.evaluator import reply_error, send_eval_jobs
from chestfed.server.federation.site_link import SiteLink

log = logging.getLogger(__name__)


def reestimate_all(link: SiteLink, models: list[Any], mode: str, probe: nn.Module,
                   settings: dict[str, Any]) -> None:
    """Replace each model's BatchNorm statistics in place (model.arrays, model.meta) when
    `mode` (eval.batchnorm) is 'precise'. `probe`: the architecture (ModelFactory.probe),
    `settings`: the evaluation's (evaluator.settings_of)."""
    if mode != "precise" or not models or not batchnorm.has_batchnorm(probe):
        return
    shared = [m for m in models if not m.local_bn]
    for m in models:
        if m.local_bn:
            m.meta["batchnorm"] = {"mode": "site", "note": "FedBN: each site's own BatchNorm, "
                                   "re-estimated on its train split with the final weights"}
    jobs = {s: [m for m in shared if s in m.trained_on] for s in link.training_sites()}
    jobs = {s: ms for s, ms in jobs.items() if ms and s in link.node_of}
    replies = send_eval_jobs(link, P.EVAL_MODE_BATCHNORM, "train", jobs, {}, {}, settings) if jobs else {}
    for m in shared:
        parts, used, problems = [], [], []
        for site in m.trained_on:
            if site not in jobs:
                problems.append(f"{site}: not a site of this run")
                continue
            reply = replies.get(site)
            err = reply_error(reply)
            if err:
                problems.append(f"{site}: {err}")
                continue
            n = int(reply.content[P.METRICS].get(f"{P.EVAL_MODEL_KEY}{m.name}/n_images", 0))
            key = P.EVAL_MODEL_PREFIX + m.name
            if n <= 0 or key not in reply.content.array_records:
                problems.append(f"{site}: no images")
                continue
            parts.append((n, reply.content[key].to_torch_state_dict()))
            used.append(site)
        info: dict[str, Any] = {"mode": "precise", "sites": used,
                                "images": sum(n for n, _ in parts)}
        if problems:
            info["skipped"] = problems
        if parts:
            state = m.arrays.to_torch_state_dict()
            for k, v in batchnorm.combine(parts).items():
                state[k] = v.to(state[k].dtype) if isinstance(state.get(k), torch.Tensor) else v
            m.arrays = ArrayRecord(state)
        else:
            info["mode"] = "running"
            info["note"] = "re-estimation impossible; training-time running averages kept"
            log.warning("model %s: BatchNorm statistics not re-estimated (%s)", m.name,
                        "; ".join(problems) or "no training site answered")
        m.meta["batchnorm"] = info
