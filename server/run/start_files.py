"""The files a run starts from, checked before Ray or a SuperLink starts: `model.weights` and,
for `sequential`, `strategy.sequential.init`.

Torch-free, so launch/before_run.py (simulate.py, compare.py, server.py) refuses a missing
file or a folder that is no run in a second, with exit 2 and no run folder, instead of in the
coordinator once Ray has started (exit 1 and a `failed` run). The rules are the ones the run
uses: `init_checkpoint` is what server/strategies/sequential.py `load_init` reads, and
`weights_file` what common/models.py loads. What is inside the file (a state dict that fits the
model) is still found by those loaders, which need torch and the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from chestfed.common.errors import ChestFedError
from chestfed.common.model_files import weights_file

KEY = "strategy.sequential.init"


def init_checkpoint(spec: str) -> Path:
    """The checkpoint file `strategy.sequential.init` names: the file itself, or in a run folder
    its single final model (`checkpoints/<model>.pt`), or `checkpoints/latest.pt` when that is
    all it holds (a run that stopped before its end). ChestFedError with one line otherwise."""
    path = Path(spec).expanduser()
    if path.is_dir():
        ckpts = sorted(p for p in (path / "checkpoints").glob("*.pt") if p.name != "latest.pt")
        latest = path / "checkpoints" / "latest.pt"
        if len(ckpts) == 1:
            return ckpts[0]
        if not ckpts and latest.is_file():
            return latest
        if not ckpts:  # not a run folder, or a run that saved no model
            raise ChestFedError(f"{KEY}: folder '{path}' holds no checkpoint (checkpoints/*.pt); "
                                "name a run folder or a .pt file")
        raise ChestFedError(f"{KEY}: run folder '{path}' holds {len(ckpts)} models "
                            f"({', '.join(p.stem for p in ckpts)}); name the checkpoint file "
                            "instead")
    if not path.is_file():
        raise ChestFedError(f"{KEY}: '{path}' not found")
    return path


def check_start_files(cfg: Any) -> list[str]:
    """One line per file of `cfg` (an ExperimentConfig) that the run could not start from."""
    lines: list[str] = []
    checks = [(weights_file, cfg.model.weights)]
    if cfg.strategy.name == "sequential":  # other strategies never read it
        checks.append((init_checkpoint, cfg.strategy.sequential.init))
    for check, spec in checks:
        if not spec:
            continue
        try:
            check(spec)
        except ChestFedError as exc:
            lines.append(str(exc))
    return lines
