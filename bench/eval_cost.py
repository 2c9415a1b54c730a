#!/usr/bin/env python
"""What does the final evaluation cost at the sites? M models scored at S sites.

Runs the real coordinator-side evaluator (server/evaluation/evaluator.py: deployable thresholds on the
training sites' validation splits, then every model at every site on test) against the real
site handler (sites/app.py, via the ClientApp), in one process: a local grid hands each
message straight to the ClientApp, so what is measured is the sites' work, not Ray's.

Instrumented and asserted:
  - at most ONE inference pass per model per site per split (`predict` calls are counted per
    site message and checked against the plan; each must cover the whole split);
  - no cache reloads: `chestfed.sites.data._load` and the image cache (`build_or_load`) are not called
    during the evaluation (each site's data was loaded once, when it joined);
  - no model rebuilt per batch: `build_model` is not called during the evaluation, and the
    forward calls equal the batches the passes need;
and reported: the inference share of the evaluation time, the cost per model-site cell, and the
BatchNorm re-estimation passes FedBN models need at sites that never trained them.

    python bench/eval_cost.py                      # M = 1, 3, 6 models at S = 3 sites (+ FedBN)
    python bench/eval_cost.py --models 1,4,8 --sites 6
Writes bench/results/eval_cost.json.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util as U  # noqa: E402


class LocalGrid:
    """Just enough of a Flower Grid: each message goes straight to the ClientApp."""

    def __init__(self, app, n_nodes: int, cache_dir: str | None = None):
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as a ServerApp's
        self.app = app
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i,
                                          node_config={"partition-id": i, "num-partitions": n_nodes,
                                                       # a simulated node's own cache (sites/app.py _local)
                                                       **({"cache-dir": cache_dir} if cache_dir else {})},
                                          state=RecordDict(), run_config={})
                         for i in range(n_nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_src_node_id"] = 0
            m.metadata.__dict__["_message_id"] = f"m{id(m)}"
            reply = self.app(m, self.contexts[m.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            out.append(reply)
        return out


class Counters:
    """Wraps the functions the assertions are about; counts calls while `active`."""

    def __init__(self):
        import chestfed.common.models
        from chestfed.common.training import SCORING_BATCH
        import chestfed.sites.app as site_app
        import chestfed.sites.node as site_node
        import chestfed.sites.cache
        import chestfed.sites.data
        self.active = False
        self.calls: Counter[str] = Counter()
        self.predict_log: list[tuple[int, int]] = []  # (images, batches) per predict call
        self.predict_s = 0.0
        self.forward = 0
        self.per_message: list[dict] = []
        self._current: dict | None = None
        c = self

        def wrap(mod, name, key):
            fn = getattr(mod, name)

            def w(*a, **k):
                if c.active:
                    c.calls[key] += 1
                return fn(*a, **k)
            setattr(mod, name, w)

        wrap(chestfed.sites.data, "_load", "site data loads")
        wrap(chestfed.sites.data, "build_or_load", "image cache opens")
        wrap(site_app, "build_model", "build_model (site)")
        wrap(chestfed.common.models, "build_model", "build_model (common)")
        wrap(site_node, "load_site", "load_site (memoised) calls")
        real_adapt = site_app._adapt_batchnorm

        def adapt(*a, **k):
            if c.active:
                c.calls["BatchNorm re-estimation passes"] += 1
                if c._current is not None:
                    c._current["bn_passes"] = c._current.get("bn_passes", 0) + 1
            return real_adapt(*a, **k)
        site_app._adapt_batchnorm = adapt
        real_predict = site_app.predict

        def predict(model, images, device, in_channels=1, batch_size=SCORING_BATCH):
            t0 = time.perf_counter()
            handle = model.register_forward_hook(lambda *a: c._count_forward())
            try:
                out = real_predict(model, images, device, in_channels, batch_size)
            finally:
                handle.remove()
            if c.active:
                c.predict_s += time.perf_counter() - t0
                c.predict_log.append((len(images), math.ceil(len(images) / batch_size)))
                if c._current is not None:
                    c._current["passes"] += 1
                    c._current["split_size"] = len(images)
                    c._current["full_split"] &= len(images) == c._current["n"]
            return out
        site_app.predict = predict

        real_eval = site_app._evaluate_models

        def evaluate_models(msg, context):
            from chestfed.sites import scoring

            from chestfed.common import protocol as P

            plan = scoring.read_plan(str(msg.content[P.CONFIG][P.EVAL_PLAN]))
            cfg = site_node.experiment(msg)
            data = site_node.site_data(cfg, context, msg)
            c._current = {"site": data.name, "mode": plan.mode, "split": plan.split,
                          "models": len(plan.models), "passes": 0, "n": len(data.splits[plan.split]),
                          "full_split": True}
            t0 = time.perf_counter()
            try:
                return real_eval(msg, context)
            finally:
                c._current["seconds"] = time.perf_counter() - t0
                c.per_message.append(c._current)
                c._current = None
        site_app._evaluate_models = evaluate_models

    def _count_forward(self) -> None:
        if self.active:
            self.forward += 1


def run_case(n_models: int, n_sites: int, local_bn: bool, counters: Counters, work: Path,
             bootstrap: int | None) -> dict:
    import torch
    from flwr.app import ArrayRecord

    import chestfed.sites.app as site_app
    from chestfed.common.config import config_from_tree
    from chestfed.common.models import build_model, is_batchnorm_key
    from chestfed.server.evaluation.evaluator import evaluate, settings_of
    from chestfed.server.federation.federation import Federation
    from chestfed.server.federation.trained import Trained
    from chestfed.server.run.folder import RunFolder
    from chestfed.server.tracking import Tracker

    tree = U.site_overrides(n_sites=n_sites if n_sites != 3 else None)
    tree["experiment"] = "bench-eval-cost"
    tree["wandb"] = {"mode": "disabled"}
    if bootstrap is not None:
        tree.setdefault("eval", {})["bootstrap"] = bootstrap
    cfg = config_from_tree(tree, "bench")
    run = RunFolder(work / f"m{n_models}-s{n_sites}-bn{int(local_bn)}")
    run.path.mkdir(parents=True, exist_ok=True)
    grid = LocalGrid(site_app.app, n_sites, cfg.data.cache_dir)
    fed = Federation.open(grid, cfg, run, Tracker(cfg, run.path, "x"), echo=lambda s: None)
    t0 = time.perf_counter()
    fed.discover(timeout=60)
    join_s = time.perf_counter() - t0

    sites = fed.sites.training_sites()
    models = []
    for k in range(n_models):
        torch.manual_seed(k)
        m = build_model(cfg.model, fed.models.n_outputs)
        state = m.state_dict()
        if local_bn:  # FedBN: the BatchNorm entries stay at the sites, as in server/strategies
            state = {n: v for n, v in state.items() if not is_batchnorm_key(n, m)}
        home = sites[k % len(sites)]
        models.append(Trained(f"model{k}", ArrayRecord(state), [home], local_bn=local_bn))
        if local_bn:  # the training site keeps its own BatchNorm, as sites/app.py train() does
            node = fed.sites.node_of[home]
            bn = {n: v for n, v in m.state_dict().items() if is_batchnorm_key(n, m)}
            # as sites/local_state.py keeps it: part bn, the model's alias, its last round
            grid.contexts[node].state[f"local-bn:{fed.sites.alias(f'model{k}')}:r1"] = ArrayRecord(bn)

    # Warm the site workers' per-process caches as a run's training rounds would have.
    site_app._model(cfg, fed.models.n_outputs)
    counters.calls.clear()
    counters.predict_log.clear()
    counters.per_message.clear()
    counters.forward, counters.predict_s = 0, 0.0
    counters.active = True
    t0 = time.perf_counter()
    ev = evaluate(fed.sites, models, fed.models.labels, settings_of(cfg.eval, cfg.seed), split="test")
    eval_s = time.perf_counter() - t0
    counters.active = False

    errors = [f"{m}/{s}: {c['error']}" for m, row in ev.matrix.items() for s, c in row.items()
              if "error" in c]
    expected_batches = sum(b for _, b in counters.predict_log)
    checks = {
        "every cell scored": not errors,
        "one pass per model per site per split": all(
            pm["passes"] == pm["models"] for pm in counters.per_message),
        "each pass covers the whole split": all(pm["full_split"] for pm in counters.per_message),
        "no cache reloads": counters.calls["site data loads"] == 0
        and counters.calls["image cache opens"] == 0,
        # The site worker builds its model once per process (cached across rounds); FedBN also
        # builds one fresh-state template once. Never one per model, message or batch.
        "no model built per model or batch": counters.calls["build_model (site)"] <= 1,
        "BatchNorm re-estimated at most once per model per site": all(
            pm.get("bn_passes", 0) <= pm["models"] for pm in counters.per_message),
        "forward calls = batches needed": counters.forward == expected_batches,
    }
    cells = n_models * n_sites
    return {
        "models": n_models, "sites": n_sites, "local_bn": local_bn, "cells": cells,
        "join_s": join_s, "eval_s": eval_s, "inference_s": counters.predict_s,
        "inference_share": counters.predict_s / eval_s if eval_s else None,
        "per_cell_s": eval_s / cells,
        "inference_passes": len(counters.predict_log), "forward_calls": counters.forward,
        "site_messages": len(counters.per_message),
        "calls": dict(counters.calls), "checks": checks, "errors": errors[:5],
        "per_message": counters.per_message,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="1,3,6", help="model counts M (default 1,3,6)")
    p.add_argument("--sites", type=int, default=3, help="phantom sites S (default 3: the demo's)")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="eval.bootstrap override (default: the config's, 200)")
    p.add_argument("--no-fedbn", action="store_true", help="skip the FedBN (local BatchNorm) case")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # as one site worker
    counters = Counters()
    work = Path(tempfile.mkdtemp(prefix="chestfed-evalcost-"))
    cases = [(m, False) for m in (int(x) for x in args.models.split(","))]
    if not args.no_fedbn:
        cases.append((max(m for m, _ in cases), True))
    results = []
    for m, bn in cases:
        r = run_case(m, args.sites, bn, counters, work, args.bootstrap)
        results.append(r)
        bad = [k for k, ok in r["checks"].items() if not ok]
        print(f"eval_cost: {m} model(s) x {args.sites} sites{' (FedBN)' if bn else ''}: "
              f"{r['eval_s']:.2f} s, {r['inference_passes']} passes, checks "
              f"{'all ok' if not bad else 'FAILED: ' + ', '.join(bad)}", flush=True)
    base = results[0]
    rows = [[f"{r['models']}{' bn' if r['local_bn'] else ''}", r["cells"], r["eval_s"],
             r["per_cell_s"], r["per_cell_s"] / base["per_cell_s"], r["inference_share"],
             r["inference_passes"], r["calls"].get("BatchNorm re-estimation passes", 0),
             r["calls"].get("site data loads", 0), r["calls"].get("build_model (site)", 0)]
            for r in results]
    print(U.table(rows, ["models", "cells", "eval s", "s/cell", "vs M=first", "infer share",
                         "passes", "BN passes", "reloads", "rebuilds"]))
    ok = all(all(r["checks"].values()) for r in results)
    dest = U.write_result("eval_cost", {"sites": args.sites, "cases": results, "all_checks_ok": ok})
    print(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; wrote {dest}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
