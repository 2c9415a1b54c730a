"""The round loop shared by the strategies that are Flower classes (fedavg.py, fedprox.py,
fedadam.py, fedyogi.py, fedbn.py, and the robust aggregators fedmedian.py, fedtrimmedavg.py,
krum.py): `run_flower` builds the named strategy with the experiment's
settings, wraps it for site-level DP (site_dp.py) or hands it to SecAgg+ (secagg.py) when the
config asks, resumes it from the last completed round, and runs it with Flower's own
`Strategy.start`; after every round the round record logs and checkpoints and the resume hooks
save the state.
"""
from __future__ import annotations

import time

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from chestfed.common import protocol as P
from chestfed.common.privacy import SECAGG_STRATEGIES
from chestfed.server.federation.federation import Federation
from chestfed.server.federation.trained import Trained
from chestfed.server.federation.personal import release
from chestfed.server.strategies.apfl import Apfl
from chestfed.server.strategies.ditto import Ditto
from chestfed.server.strategies.fedadam import FedAdam
from chestfed.server.strategies.fedavg import FedAvg
from chestfed.server.strategies.fedbn import FedBN
from chestfed.server.strategies.fedmedian import FedMedian
from chestfed.server.strategies.fedper import FedPer
from chestfed.server.strategies.fenda import Fenda
from chestfed.server.strategies.fedprox import FedProx
from chestfed.server.strategies.fedrep import FedRep
from chestfed.server.strategies.fedtrimmedavg import FedTrimmedAvg
from chestfed.server.strategies.fedyogi import FedYogi
from chestfed.server.strategies.krum import Krum
from chestfed.server.strategies.mrmtl import MrMtl
from chestfed.common.privacy import ADAPTIVE_KEY
from chestfed.common.privacy import UNIT_WEIGHT
from chestfed.server.privacy.secagg import run_secagg
from chestfed.server.privacy.site_dp import wrap

FLOWER_STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
                     "fedbn": FedBN, "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg,
                     "krum": Krum, "ditto": Ditto, "fedper": FedPer, "fedrep": FedRep,
                     "mrmtl": MrMtl, "apfl": Apfl, "fenda": Fenda}


class SubsetGrid:
    """A view of the Grid that shows a strategy only some sites (leave-one-site-out)."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        live = set(self._grid.get_node_ids())
        return [n for n in self._ids if n in live]

    def __getattr__(self, name: str):  # everything else is the real grid's
        return getattr(self._grid, name)


def run_flower(fed: Federation, name: str | None = None, sites: list[str] | None = None,
               model_name: str | None = None, label: str = "") -> list[Trained]:
    """Train one global model with Flower strategy `name` on `sites` (default: all)."""
    conf = fed.strategy
    name = name or conf.name
    sites = sites or fed.sites.training_sites()
    model_name = model_name or name
    if fed.privacy.secagg and name in SECAGG_STRATEGIES:  # Flower's SecAgg+ (secagg.py)

        return run_secagg(fed, name, sites, model_name, local_bn=FLOWER_STRATEGIES[name].local_bn)
    grid = SubsetGrid(fed.sites.grid, [fed.sites.node_of[s] for s in sites])
    n = len(sites)
    min_sites = max(1, min(conf.min_sites, n))
    kwargs = dict(fraction_train=conf.fraction, fraction_evaluate=conf.fraction_evaluate,
                  min_train_nodes=min_sites, min_evaluate_nodes=min_sites,
                  min_available_nodes=min_sites, arrayrecord_key=P.ARRAYS,
                  configrecord_key=P.CONFIG)
    kind = FLOWER_STRATEGIES[name]
    kwargs.update(kind.options(conf))  # FedProx's mu, FedAdam's and FedYogi's server rate
    site_dp = fed.privacy.dp.level == "site"
    if site_dp:  # Flower's DP noise is calibrated to an unweighted mean of the sites' updates

        kwargs["weighted_by_key"] = UNIT_WEIGHT
    strategy = kind(**kwargs)
    strategy.fed, strategy.model_name = fed, model_name
    # eval.round_validation: one exchange a round where it changes nothing (validation.py)
    strategy.carry_validation, strategy.last_round = fed.validation.carried(conf), conf.rounds

    initial = fed.models.initial_arrays(local_bn=kind.local_bn)
    if not kind.local_bn:
        bn_keys = fed.models.batchnorm_keys()
        strategy.buffer_keys = frozenset(k for k in bn_keys if not k.endswith((".weight", ".bias")))
    extra = {P.LOCAL_EPOCHS: fed.train.local_epochs, P.KEEP_LOCAL_BN: kind.local_bn,
             P.MODEL: model_name, **kind.site_settings(conf)}
    runner = strategy
    if site_dp:  # Flower's DifferentialPrivacy*Clipping wrapper (server/privacy/site_dp.py)

        runner = wrap(strategy, fed, model_name, sites, max(int(n * conf.fraction), min_sites))
        extra[ADAPTIVE_KEY] = fed.privacy.dp.clipping == "adaptive"  # which clipping mod at a site

    done = fed.resume.finished_model(model_name)  # leave-one-site-out: finished before a resume
    if done is not None:
        return [done]
    start = 0
    saved = fed.resume.resume(model_name)
    if saved is not None:
        # --resume: the weights after round k and, for FedAdam/FedYogi, the server moments; the
        # sites derive each round's seed from the round number, so rounds k+1.. replay exactly.
        start, initial = int(saved["round"]), ArrayRecord(saved["arrays"])
        strategy.round_offset = start
        if "m_t" in saved:
            strategy.m_t = {k: v.numpy() for k, v in saved["m_t"].items()}
            strategy.v_t = {k: v.numpy() for k, v in saved["v_t"].items()}
        if start >= conf.rounds:
            return _finished(fed, kind, model_name, sites, initial, extra)

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            rnd = server_round + start
            ended, state = time.perf_counter(), {"round": rnd, "arrays": arrays.to_torch_state_dict()}
            if getattr(strategy, "m_t", None):  # FedOpt's server moments (float64, kept as is)
                state["m_t"], state["v_t"] = dict(strategy.m_t), dict(strategy.v_t)

            def done() -> None:
                fed.record.end_round(rnd, conf.rounds, arrays, label, trained_on=sites, ended_at=ended)
                fed.resume.save_state(model_name, state, f"round {rnd}/{conf.rounds} of {model_name}")
            # now, or when its validation arrives in the next round's training replies
            strategy.finish_round(server_round, done)
        return None

    result = runner.start(grid=grid, initial_arrays=initial, num_rounds=conf.rounds - start,
                            timeout=conf.round_timeout,
                            train_config=fed.sites.config_record(**extra),
                            evaluate_config=fed.sites.config_record(**{P.SPLIT: "val", **extra}),
                            evaluate_fn=after_round)
    return _finished(fed, kind, model_name, sites, result.arrays, extra)


def _finished(fed: Federation, kind: type, model_name: str, sites: list[str], arrays: ArrayRecord,
              settings: dict) -> list[Trained]:
    """The models a finished Flower strategy yields: its global model; for a personalised
    method (kind.personal) each site's personal model, released once (federation/personal.py),
    and the global one under `<method>-global` where it is a whole model."""
    if not kind.personal:
        return [Trained(model_name, arrays, list(sites), local_bn=kind.local_bn)]
    out = [Trained(f"{model_name}-global", arrays, list(sites))] if kind.has_global else []
    own, failed = release(fed.sites, model_name, sites, arrays, settings)
    for site, why in failed.items():
        fed.record.mark_failed(f"{model_name}-{site}", site, fed.strategy.rounds, why)
    return out + [Trained(f"{model_name}-{s}", own[s], [s], meta={"personal": kind.personal})
                  for s in sites if s in own]
