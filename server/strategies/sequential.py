"""`sequential`: one model passed from site to site (cyclic weight transfer).

Chang, Balachandar, Lam, Yi, Brown, Beers, Rosen, Rubin, Kalpathy-Cramer 2018, "Distributed deep
learning networks among institutions for medical imaging" (JAMIA): cyclical weight transfer,
each institution training the model for a while and handing it on, for several cycles.

`strategy.sequential.order` (default: config order), `epochs_per_site` and `cycles` set the
schedule (by default the shared budget: `strategy.rounds` cycles of `train.local_epochs`).
`init` starts from an earlier run's checkpoint (a run folder or a .pt file), which is how Bajwa
et al.'s NIH -> CheXpert -> Shifa regime is expressed; the sites that checkpoint was trained on
(its `trained_on`, itself transitive over earlier stages) stay in every stage's `trained_on`, so
they are scored as internal. Every stage's model is kept and scored at every site, so forgetting
shows in the matrix. The coordinator records, per stage, the training site's numbers and every
site's validation numbers, and saves the model, the sites visited and the stages for `--resume`.
A stage whose site fails (its data cannot be loaded, its training raises, it does not answer) is
marked failed with the reason (results.json `failed`, the matrix, the report) and skipped: the
model goes on to the next site as it was. The run needs `strategy.min_sites` sites that trained
at least one stage.
"""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from chestfed.common.errors import ChestFedError
from chestfed.server.federation.federation import Federation
from chestfed.server.federation.trained import SiteFailure, Trained
from chestfed.server.run.start_files import init_checkpoint
import yaml


def load_init(spec: str) -> tuple[ArrayRecord, list[str]]:
    """A checkpoint file, or a run folder (its single final model, or `checkpoints/latest.pt`).

    Returns the weights and the sites they were trained on: the checkpoint's own record, or for
    a `latest.pt` without one, the sites of that run's config.yaml.
    """
    path = init_checkpoint(spec)  # the rules the launchers check before anything starts
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("model", blob) if isinstance(blob, dict) else blob
    meta = blob.get("meta", {}) if isinstance(blob, dict) and "model" in blob else {}
    trained_on = [str(s) for s in meta.get("trained_on") or []]
    run_config = path.parent.parent / "config.yaml"
    if not trained_on and path.parent.name == "checkpoints" and run_config.is_file():
        trained_on = [str(s["name"]) for s in (yaml.safe_load(run_config.read_text()) or {}).get("sites", [])]
    return ArrayRecord({k: v for k, v in state.items()}), trained_on


def run_sequential(fed: Federation) -> list[Trained]:
    seq = fed.strategy.sequential
    everywhere = fed.sites.training_sites()
    order = seq.order or everywhere
    cycles = seq.cycles or fed.strategy.rounds
    epochs = seq.epochs_per_site or fed.train.local_epochs
    weights, earlier = load_init(seq.init) if seq.init else (fed.models.initial_arrays(), [])
    if seq.init:
        expected = set(fed.models.initial_arrays().keys())
        if set(weights.keys()) != expected:
            raise ChestFedError(f"strategy.sequential.init: '{seq.init}' does not fit this model "
                                f"({fed.models.cfg.arch}, {fed.models.n_outputs} outputs)")
    stages: list[Trained] = []
    visited: list[str] = list(earlier)  # an init checkpoint's sites count as trained on
    total = cycles * len(order)
    done = 0
    saved = fed.resume.resume("sequential")
    if saved is not None:  # --resume: the model after the last completed stage, and the stages
        done = int(saved["step"])
        weights, visited = ArrayRecord(saved["weights"]), list(saved["visited"])
        stages = [fed.resume.finished_model(n) for n in saved["stages"]]
    step = 0
    for cycle in range(1, cycles + 1):
        for site in order:
            step += 1
            if step <= done:
                continue
            try:
                out = fed.train_at(step, "sequential", {site: (weights, epochs)})
            except SiteFailure:
                out = {}
            if site in out:
                weights = out[site]
                visited.append(site)
                # train.lr_schedule plateau steps once per cycle, as the other strategies step
                # once per round (each site's data seen once more): stepped at every visit, its
                # patience ran out within a cycle on the site-to-site swings of the loss
                fed.eval_at(step, "sequential", {s: weights for s in everywhere},
                              schedule=step % len(order) == 0)
                stage = Trained(f"sequential-stage-{step}", weights, list(dict.fromkeys(visited)),
                                meta={"stage": step, "site": site, "cycle": cycle,
                                      **({"init": str(seq.init), "init_trained_on": earlier}
                                         if seq.init else {})})
                stages.append(stage)
                fed.resume.keep_finished(stage, save=False)  # state.pt names it below
            else:  # skipped: the model goes on to the next site as it was
                fed.record.mark_failed(f"sequential-stage-{step}", site, step)
            fed.record.end_round(step, total, weights, label=f" [{site}, cycle {cycle}]",
                            trained_on=list(dict.fromkeys(visited)))
            fed.resume.save_state("sequential", {"step": step, "weights": weights.to_torch_state_dict(),
                                                 "visited": visited,
                                                 "stages": [t.name for t in stages]},
                                  f"stage {step}/{total} of sequential")
    fed.record.require_sites("sequential", list(dict.fromkeys(t.meta["site"] for t in stages)))
    final = stages[-1]
    return [Trained("sequential", final.arrays, final.trained_on, meta=final.meta)] + (
        stages[:-1] if len(stages) > 1 else [])
