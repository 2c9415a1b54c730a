"""FedAvg and FedProx through Flower's SecAgg+ (`privacy.secagg: true`).

Bell, Bonawitz, Gascon, Lepoint, Raykova 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead" (ACM CCS): SecAgg+, the secure aggregation protocol of Bonawitz et
al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS) with each
client sharing keys with a subset of the others.

Each round runs Flower's own `SecAggPlusWorkflow` (flwr.server.workflow): setup and key
exchange, then every site trains, masks its quantised update and sends only the masked vector
(`secaggplus_mod` at the site, sites/privacy.py), then the surviving sites' key shares let the
coordinator remove the masks of the *sum*. The coordinator never holds one site's update.

Flower 1.41 offers SecAgg+ only through its legacy workflow API (a `LegacyContext` holding a
legacy `Strategy`): `_Relay` is that legacy strategy, reduced to handing the workflow the
round's sites and taking back the aggregate, so the loop, the per-round record and the
evaluation stay the coordinator's as for every other strategy. The aggregation is Flower's:
the workflow's weighted mean (by each site's train images, as FedAvg) of the updates.

What a site sends, and in what form: its update (new weights minus the round's global weights;
float tensors only, so they fit the protocol's clipping range of +-8 before quantisation) masked;
in the clear its image count (the mean's weight; it is public in a plain run too) and training
counts (images, steps, seconds, lr, and under record-level DP the accounting numbers), never its
training loss. Integer buffers (BatchNorm's batch counters, which the layers do not use with a
set momentum) are not masked: they are rebuilt here from the counts, as FedAvg would average them.
The coordinator records, per round and site, those counts (marked `secagg`), dropouts, and every
site's validation numbers of the unmasked global model.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.server.strategy import Strategy as LegacyStrategy

from common import protocol as P
from common.errors import site_error_line
from server.coordinator import Coordinator, SiteFailure, Trained

# SecAgg+ settings. Every sampled site holds a share of every other's keys (num_shares 1.0);
# two thirds of them can rebuild a dropped site's mask (Flower rounds it, at least 2).
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3
CLIPPING_RANGE = 8.0  # Flower's default: an update's entries must lie in [-8, 8]


def run_secagg(coord: Coordinator, name: str, sites: list[str], model_name: str) -> list[Trained]:
    from flwr.server.workflow import SecAggPlusWorkflow

    cfg = coord.cfg
    # The mean's weights are the sites' train images; max_weight bounds them so the quantised
    # weighted sums cannot overflow (each site's weight / max_weight <= 1).
    max_weight = float(max(int(coord.site_info[s]["n_train"]) for s in sites))
    workflow = SecAggPlusWorkflow(NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=max_weight,
                                  clipping_range=CLIPPING_RANGE,
                                  timeout=cfg.strategy.round_timeout)
    weights = coord.initial_arrays()
    extra: dict[str, Any] = {P.LOCAL_EPOCHS: cfg.train.local_epochs, P.MODEL: model_name}
    if name == "fedprox":
        extra[P.PROX_MU] = cfg.strategy.proximal_mu
    for rnd in range(1, cfg.strategy.rounds + 1):
        weights = _round(coord, workflow, rnd, weights, sites, model_name, extra)
        coord.eval_at(rnd, model_name, {s: weights for s in sites})
        coord.end_round(rnd, cfg.strategy.rounds, weights, trained_on=sites)
    return [Trained(model_name, weights, list(sites))]


def _round(coord: Coordinator, workflow: Any, rnd: int, weights: ArrayRecord, sites: list[str],
           model_name: str, extra: dict[str, Any]) -> ArrayRecord:
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    arrays = {k: a.numpy() for k, a in weights.items()}
    float_keys = [k for k, a in arrays.items() if a.dtype.kind == "f"]
    relay = _Relay([coord.node_of[s] for s in sites])
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: rnd}),
                        MAIN_PARAMS_RECORD: ArrayRecord({k: Array(arrays[k]) for k in float_keys})})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=relay)
    settings = {**extra, P.ROUND: rnd, P.SECAGG_KEYS: json.dumps(float_keys)}
    grid = _Settings(coord.grid, settings)
    workflow(grid, context)
    for node, reason in grid.errors:
        coord.dropouts.append({"round": rnd, "site": coord.site_of.get(node, str(node)),
                               "reason": reason})
    if relay.aggregate is None:
        why = "; ".join(f"{coord.site_of.get(n, n)}: {site_error_line(r)}" for n, r in grid.errors)
        raise SiteFailure(f"round {rnd}: secure aggregation did not complete "
                          f"({why or 'too few sites answered for SecAgg+ to unmask the sum'})")
    counts = []
    for node, res in relay.results:
        site = coord.site_of.get(node, "?")
        metrics = {**res.metrics, P.NUM_EXAMPLES: res.num_examples}
        _record(coord, rnd, site, model_name, metrics)
        counts.append((float(res.num_examples), float(metrics.get("steps", 0))))
    new = {}
    for k, delta in zip(float_keys, relay.aggregate):
        new[k] = (arrays[k].astype(np.float64) + delta).astype(arrays[k].dtype)
    total = sum(n for n, _ in counts) or 1.0
    mean_steps = sum(n * s for n, s in counts) / total
    for k, a in arrays.items():  # integer buffers: what FedAvg's weighted mean of them gives
        if k not in new:
            new[k] = (a.astype(np.float64) + mean_steps).astype(a.dtype)
    return ArrayRecord({k: Array(np.asarray(new[k])) for k in arrays})


def _record(coord: Coordinator, rnd: int, site: str, model: str, m: dict[str, Any]) -> None:
    """A site's training counts into the round's record (Coordinator.record_train's row, without
    the loss, which does not leave a site under SecAgg+)."""
    coord.images_processed += int(m.get("images", 0))
    coord.optimizer_steps += int(m.get("steps", 0))
    row = coord._row(rnd, site, model)
    row.update({"images": int(m.get("images", 0)), "steps": int(m.get("steps", 0)),
                "train_seconds": float(m.get("seconds", float("nan"))), "secagg": True})
    if "lr" in m:
        row["lr"] = float(m["lr"])
    coord.privacy.on_train(site, m, row)


class _Settings:
    """The coordinator's Grid for the workflow's messages: each carries the round's settings in
    the `config` record, which the coordinator's SiteGrid completes with the destination site's
    part of the experiment (the SecAgg+ stages themselves only read their own record)."""

    def __init__(self, grid: Any, settings: dict[str, Any]):
        self._grid, self._settings = grid, settings
        self.errors: list[tuple[int, str]] = []  # (node, reason) of every failed reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        msgs = list(messages)
        for m in msgs:
            content = RecordDict(dict(m.content.items()))  # the workflow shares one across nodes
            content[P.CONFIG] = ConfigRecord(dict(self._settings))
            m.content = content
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        self.errors += [(sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id),
                         str(r.error.reason)) for r in replies if r.has_error()]
        return replies


class _Relay(LegacyStrategy):
    """The legacy Strategy the SecAgg+ workflow drives: every site of the round, the same
    (empty) settings, and the unmasked mean kept as it comes (`aggregate_fit` receives it as
    every result's parameters)."""

    def __init__(self, node_ids: list[int]):
        self.node_ids = node_ids
        self.aggregate: list[np.ndarray] | None = None
        self.results: list[tuple[int, Any]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        from flwr.common import FitIns
        from flwr.server.compat.grid_client_proxy import GridClientProxy

        return [(GridClientProxy(n, None, 0), FitIns(parameters, {})) for n in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        from flwr.common import parameters_to_ndarrays

        self.failures = list(failures)
        self.results = [(proxy.node_id, res) for proxy, res in results]
        if results:
            self.aggregate = [a.astype(np.float64) for a in parameters_to_ndarrays(results[0][1].parameters)]
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None
