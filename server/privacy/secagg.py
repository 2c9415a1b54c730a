"""FedAvg, FedProx and FedBN's shared layers through Flower's SecAgg+ (`privacy.secagg: true`).

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

from chestfed.common import protocol as P
from chestfed.common.errors import site_error_line
from chestfed.server.federation.federation import Federation
from chestfed.server.federation.round_record import RoundRecord
from chestfed.server.federation.trained import SiteFailure, Trained
from flwr.common import FitIns
from flwr.common import parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

# SecAgg+ settings. Every sampled site holds a share of every other's keys (num_shares 1.0);
# two thirds of them can rebuild a dropped site's mask (Flower rounds it, at least 2).
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3
CLIPPING_RANGE = 8.0  # Flower's default: an update's entries must lie in [-8, 8]


def run_secagg(fed: Federation, name: str, sites: list[str], model_name: str,
               local_bn: bool = False) -> list[Trained]:
    """`name` (fedavg, fedprox or fedbn) under SecAgg+; with `local_bn` (FedBN) the BatchNorm
    layers stay at each site, so only the shared layers are masked, summed and unmasked."""
    conf = fed.strategy
    # The mean's weights are the sites' train images; max_weight bounds them so the quantised
    # weighted sums cannot overflow (each site's weight / max_weight <= 1).
    max_weight = float(max(int(fed.sites.site_info[s]["n_train"]) for s in sites))
    workflow = _workflow_class()(NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=max_weight,
                                 clipping_range=CLIPPING_RANGE, timeout=conf.round_timeout)
    weights = fed.models.initial_arrays(local_bn=local_bn)  # FedBN: no BatchNorm at the coordinator
    extra: dict[str, Any] = {P.LOCAL_EPOCHS: fed.train.local_epochs, P.MODEL: model_name,
                             P.KEEP_LOCAL_BN: local_bn}
    if name == "fedprox":
        extra[P.PROX_MU] = conf.proximal_mu
    start, saved = 0, fed.resume.resume(model_name)
    if saved is not None:  # --resume: the global weights after the last completed round
        start, weights = int(saved["round"]), ArrayRecord(saved["arrays"])
    for rnd in range(start + 1, conf.rounds + 1):
        weights = _round(fed, workflow, rnd, weights, sites, model_name, extra)
        fed.eval_at(rnd, model_name, {s: weights for s in sites}, **{P.KEEP_LOCAL_BN: local_bn})
        fed.record.end_round(rnd, conf.rounds, weights, trained_on=sites)
        # Each round's masks and keys are fresh, so nothing of the protocol needs keeping; the
        # sites quantise with stochastic rounding, so a resumed run equals an uninterrupted one
        # within the quantisation tolerance, not bit for bit.
        fed.resume.save_state(model_name, {"round": rnd, "arrays": weights.to_torch_state_dict()},
                              f"round {rnd}/{conf.rounds} of {model_name}")
    return [Trained(model_name, weights, list(sites), local_bn=local_bn)]


def _round(fed: Federation, workflow: Any, rnd: int, weights: ArrayRecord, sites: list[str],
           model_name: str, extra: dict[str, Any]) -> ArrayRecord:

    arrays = {k: a.numpy() for k, a in weights.items()}
    float_keys = [k for k, a in arrays.items() if a.dtype.kind == "f"]
    link, record = fed.sites, fed.record
    relay = _Relay([link.node_of[s] for s in sites])
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: rnd}),
                        MAIN_PARAMS_RECORD: ArrayRecord({k: Array(arrays[k]) for k in float_keys})})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=relay)
    settings = {**extra, P.ROUND: rnd, P.SECAGG_KEYS: json.dumps(float_keys)}
    grid = _Settings(link.grid, settings)
    workflow(grid, context)
    failed: dict[str, str] = {}  # site -> the first reason it gave this round
    for node, reason in grid.errors:
        site = link.site_of.get(node, str(node))
        record.dropouts.append({"round": rnd, "site": site, "reason": reason})
        failed.setdefault(site, reason)
    link.note_presence(sites, {link.site_of.get(n, str(n)): m for n, m in grid.last.items()})
    why = "; ".join(f"{s}: {site_error_line(r)}" for s, r in failed.items())
    if relay.aggregate is None:
        if not failed:
            raise SiteFailure(f"round {rnd}: SecAgg+ stopped before unmasking the sum "
                              f"({len(sites)} site(s); it needs at least 2)")
        raise SiteFailure(f"round {rnd}: SecAgg+ could not unmask the sum: {len(sites) - len(failed)} "
                          f"of {len(sites)} sites took part to the end and its reconstruction "
                          f"threshold is {threshold(len(sites))}; failed: {why}")
    need = min(fed.strategy.min_sites, len(sites))
    if len(relay.results) < need:
        raise SiteFailure(f"round {rnd}: only {len(relay.results)} site(s) trained "
                          f"(failed: {why or 'none named'}); strategy.min_sites is "
                          f"{fed.strategy.min_sites}")
    counts = []
    for node, res in relay.results:
        site = link.site_of.get(node, "?")
        metrics = {**res.metrics, P.NUM_EXAMPLES: res.num_examples}
        _record(record, rnd, site, model_name, metrics)
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


def _record(record: RoundRecord, rnd: int, site: str, model: str, m: dict[str, Any]) -> None:
    """A site's training counts into the round's record (RoundRecord.record_train's row, without
    the loss, which does not leave a site under SecAgg+)."""
    record.count(int(m.get("images", 0)), int(m.get("steps", 0)))
    row = record.row(rnd, site, model)
    row.update({"images": int(m.get("images", 0)), "steps": int(m.get("steps", 0)),
                "train_seconds": float(m.get("seconds", float("nan"))), "secagg": True})
    if "lr" in m:
        row["lr"] = float(m["lr"])
    record.privacy.on_train(site, m, row)


def threshold(n_sites: int) -> int:
    """How many of a round's sites SecAgg+ needs to the end to unmask the sum: Flower's
    reading of NUM_SHARES and RECONSTRUCTION_THRESHOLD (SecAggPlusWorkflow.setup_stage)."""
    shares = round(NUM_SHARES * n_sites)
    if shares < n_sites and shares % 2 == 0:
        shares += 1
    if shares <= 2:
        shares = n_sites
    return max(round(RECONSTRUCTION_THRESHOLD * shares), 2)


def _workflow_class() -> type:
    class Workflow(SecAggPlusWorkflow):
        """Flower's SecAgg+ workflow, with one fix (Flower 1.41): a site that drops out before
        it has shared its keys (setup or share-keys stage) halts the round, however many sites
        remain. `unmask_stage` counts it among the dead (`sampled_node_ids - active_node_ids`),
        asks every survivor for its key share, which none holds (the site never sent one), so
        every survivor's secaggplus_mod fails (`state.sk1_share_dict[nid]`, a KeyError), and
        the sum cannot be unmasked ("Not enough shares to recover secret"). The protocol
        (Bell et al. 2020) goes on with the sites that shared their keys: the survivors never
        masked against the others (they mask against the sources of the shares they received).
        So after the share-keys stage, the round's sites are those that shared their keys."""

        def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
            super().share_keys_stage(grid, context, state)
            kept = set(state.active_node_ids)
            state.sampled_node_ids = kept
            state.nid_to_neighbours = {n: set(nb) & kept for n, nb in state.nid_to_neighbours.items()
                                       if n in kept}
            return self._check_threshold(state)

    return Workflow


class _Settings:
    """The coordinator's Grid for the workflow's messages: each carries the round's settings in
    the `config` record, which the coordinator's SiteGrid completes with the destination site's
    part of the experiment (the SecAgg+ stages themselves only read their own record)."""

    def __init__(self, grid: Any, settings: dict[str, Any]):
        self._grid, self._settings = grid, settings
        self.errors: list[tuple[int, str]] = []  # (node, reason) of every failure, no reply included
        self.last: dict[int, Any] = {}  # node -> its failed reply, else its latest (no reply: none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        msgs = list(messages)
        for m in msgs:
            content = RecordDict(dict(m.content.items()))  # the workflow shares one across nodes
            content[P.CONFIG] = ConfigRecord(dict(self._settings))
            m.content = content
        replies = list(self._grid.send_and_receive(msgs, timeout=timeout))
        # A reply for a site that went away comes from the SuperLink: name it by the message.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        answered = set()
        for r in replies:
            node = sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            if r.has_error():
                self.errors.append((node, str(r.error.reason)))
                self.last[node] = r
            elif node not in self.last or not self.last[node].has_error():
                self.last[node] = r
        for node in sorted(set(sent_to.values()) - answered):  # the workflow drops it silently
            self.errors.append((node, "no reply within strategy.round_timeout"))
            if node in self.last and not self.last[node].has_error():
                del self.last[node]
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
        return [(GridClientProxy(n, None, 0), FitIns(parameters, {})) for n in self.node_ids]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
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
