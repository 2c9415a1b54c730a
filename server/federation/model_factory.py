"""The run's model: its seeded initial weights (whole, or without BatchNorm for FedBN), the
BatchNorm keys, a probe to inspect its layers, and the final checkpoints' files."""
from __future__ import annotations

from flwr.app import ArrayRecord
from torch import nn

from chestfed.common.config.schema import ModelConfig
from chestfed.common.models import batchnorm_keys, build_model
from chestfed.common.training import seed_everything
from chestfed.server.federation.trained import Trained
from chestfed.server.run.folder import RunFolder


class ModelFactory:
    def __init__(self, model: ModelConfig, labels: list[str], seed: int):
        self.cfg, self.labels, self.seed = model, list(labels), seed

    @property
    def n_outputs(self) -> int:
        return len(self.labels)

    def initial_arrays(self, local_bn: bool = False) -> ArrayRecord:
        """The seeded initial weights; local_bn (FedBN): without the BatchNorm parameters and
        buffers, which never leave a site, so the coordinator holds only the shared layers."""
        seed_everything(self.seed)
        state = build_model(self.cfg, self.n_outputs).state_dict()
        if local_bn:
            bn = self.batchnorm_keys()
            state = {k: v for k, v in state.items() if k not in bn}
        return ArrayRecord(state)

    def batchnorm_keys(self) -> frozenset[str]:
        return batchnorm_keys(self.cfg, self.n_outputs)

    def probe(self) -> nn.Module:
        """The architecture without any weights file (to inspect its layers)."""
        return build_model(self.cfg.model_copy(update={"weights": None}), self.n_outputs)

    def save_final(self, run: RunFolder, models: list[Trained], strategy: str) -> dict[str, str]:
        """Each model under comparison as checkpoints/<name>.pt; returns name -> path in the run."""
        paths = {}
        for m in models:
            p = run.save_checkpoint(m.name, m.arrays.to_torch_state_dict(),
                                    {"trained_on": m.trained_on, "strategy": strategy,
                                     "arch": self.cfg.arch, "task": self.labels,
                                     "batchnorm": (m.meta.get("batchnorm") or {}).get("mode", "running")})
            paths[m.name] = str(p.relative_to(run.path))
        return paths
