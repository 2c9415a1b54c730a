"""`loso`: leave-one-site-out, each site in turn an external test (Cohen et al. 2020, Fig. 2).

Cohen, Hashir, Brooks, Bertrand 2020, "On the limits of cross-domain generalization in automated
X-ray prediction" (MIDL): train on all domains but one, test on the one left out.

For each site, train the base strategy (`strategy.loso_base`, default fedavg; pooled also
works) on all the other sites; the held-out site is then an external test of a model that never
saw it. The coordinator records each of these models under `loso-<site>` as the base strategy
records its own, and keeps each finished one so a `--resume` skips it.
"""
from __future__ import annotations

from chestfed.server.federation.federation import Federation
from chestfed.server.federation.trained import Trained
from chestfed.server.federation.flower_loop import FLOWER_STRATEGIES, run_flower
from chestfed.server.strategies.pooled import run_pooled


def run_loso(fed: Federation) -> list[Trained]:
    base = fed.strategy.loso_base
    sites = fed.sites.training_sites()
    out: list[Trained] = []
    for held in sites:
        others = [s for s in sites if s != held]
        name, label = f"loso-{held}", f" [without {held}]"
        # each resumes by itself (its own unit in the resume state) or returns the model it
        # finished before an interruption
        models = run_flower(fed, base, others, name, label) if base in FLOWER_STRATEGIES else \
            run_pooled(fed, others, name, label)
        for m in models:
            fed.resume.keep_finished(m, unit=name)
        out += models
    return out
