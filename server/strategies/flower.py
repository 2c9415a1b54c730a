"""FedAvg, FedProx, FedAdam, FedYogi and FedBN through Flower's own strategy classes.

The classes are used as they are; a thin subclass only taps their replies so each site's
numbers are recorded (Flower's aggregate would average them away), skips evaluation rounds
that `eval.every` does not ask for, and enforces `strategy.min_sites`.
"""
from __future__ import annotations

from typing import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from common import protocol as P
from common.models import build_model, is_batchnorm_key
from server.coordinator import Coordinator, Trained

BASES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
         "fedbn": FedAvg}


class SubsetGrid:
    """A view of the Grid that shows a strategy only some sites (leave-one-site-out)."""

    def __init__(self, grid: Grid, node_ids: list[int]):
        self._grid, self._ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        live = set(self._grid.get_node_ids())
        return [n for n in self._ids if n in live]

    def __getattr__(self, name: str):  # everything else is the real grid's
        return getattr(self._grid, name)


def _like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Cast aggregated arrays back to the sites' dtypes: server optimisers compute in float64
    (and averaging turns int64 counters into floats), which would double every message."""
    out = ArrayRecord()
    for k, arr in arrays.items():
        ref = reference[k].numpy() if k in reference else None
        a = arr.numpy()
        out[k] = Array(a.astype(ref.dtype) if ref is not None and a.dtype != ref.dtype else a)
    return out


def _tapped(base: type[FedAvg]) -> type[FedAvg]:
    class Tapped(base):  # type: ignore[misc, valid-type]
        coord: Coordinator
        model_name: str
        buffer_keys: frozenset[str] = frozenset()
        round_offset: int = 0  # resume: Flower counts from 1 again, the experiment from k+1
        _train_msgs: tuple[Message, ...] = ()

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            coord = getattr(self, "coord", None)  # (tests drive a bare strategy without one)
            lr = coord.lr_config(self.model_name) if coord is not None else {}  # lr_schedule plateau
            if lr:
                config = ConfigRecord({**dict(config.items()), **lr})
            msgs = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
            self._train_msgs = tuple(msgs)
            return msgs

        def aggregate_train(self, server_round: int, replies: Iterable[Message]
                            ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            server_round += self.round_offset
            # A site that went away: the SuperLink answers for it (src = the SuperLink, not the
            # node) once its heartbeat lapses; or nothing comes back within round_timeout.
            # Either way the dropout is recorded under the site's name.
            dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._train_msgs}
            site = self.coord.site_of
            kept, answered, by_site = [], set(), {}
            for r in replies:
                node = r.metadata.src_node_id
                if node not in site and r.metadata.reply_to_message_id in dst:
                    node = dst[r.metadata.reply_to_message_id]
                    self.coord.dropouts.append({"round": server_round, "site": site.get(node, str(node)),
                                                "reason": r.error.reason if r.has_error() else "?"})
                else:
                    kept.append(r)
                answered.add(node)
                by_site[site.get(node, str(node))] = r
            # a console line when a site drops out, and when it answers again
            self.coord.note_presence([site.get(n, str(n)) for n in dst.values()], by_site)
            for node in dst.values():
                if node not in answered:
                    self.coord.dropouts.append({"round": server_round, "site": site.get(node, str(node)),
                                                "reason": "no reply within strategy.round_timeout"})
            # Replies in site order: the weighted average is then the same bits on every rerun.
            kept.sort(key=lambda r: site.get(r.metadata.src_node_id, ""))
            good = self.coord.record_train(server_round, kept, self.model_name,
                                           expected=len(dst) or None)
            arrays, metrics = super().aggregate_train(server_round, good)
            if arrays is not None and self.buffer_keys and base is not FedAvg and base is not FedProx:
                # Server optimisers (Adam, Yogi) should step trainable weights only: a server
                # Adam step on a BatchNorm running variance can push it below zero.
                plain, _ = FedAvg.aggregate_train(self, server_round, good)
                for k in self.buffer_keys:
                    arrays[k] = plain[k]
            if arrays is not None and good:
                arrays = _like(arrays, good[0].content[P.ARRAYS])
            return arrays, metrics

        def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                               grid: Grid) -> Iterable[Message]:
            server_round += self.round_offset
            every = self.coord.cfg.eval.every
            if every == 0 or server_round % every:
                return []
            self._eval_arrays = arrays  # eval.checkpoints best_val keeps them if best
            return super().configure_evaluate(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            self.coord.record_eval(server_round + self.round_offset, replies, self.model_name,
                                   getattr(self, "_eval_arrays", None))
            return None  # per-site numbers are what matter; they are recorded above

    Tapped.__name__ = base.__name__
    return Tapped


def run_flower(coord: Coordinator, name: str | None = None, sites: list[str] | None = None,
               model_name: str | None = None, label: str = "") -> list[Trained]:
    """Train one global model with Flower strategy `name` on `sites` (default: all)."""
    cfg = coord.cfg
    name = name or cfg.strategy.name
    sites = sites or coord.training_sites()
    model_name = model_name or name
    if cfg.privacy.secagg and name in ("fedavg", "fedprox"):  # Flower's SecAgg+ (secagg.py)
        from server.strategies.secagg import run_secagg

        return run_secagg(coord, name, sites, model_name)
    grid = SubsetGrid(coord.grid, [coord.node_of[s] for s in sites])
    n = len(sites)
    min_sites = max(1, min(cfg.strategy.min_sites, n))
    kwargs = dict(fraction_train=cfg.strategy.fraction, fraction_evaluate=1.0,
                  min_train_nodes=min_sites, min_evaluate_nodes=min_sites,
                  min_available_nodes=min_sites, arrayrecord_key=P.ARRAYS,
                  configrecord_key=P.CONFIG)
    if name == "fedprox":
        kwargs["proximal_mu"] = cfg.strategy.proximal_mu
    if name in ("fedadam", "fedyogi"):
        kwargs["eta"] = cfg.strategy.server_lr
    site_dp = cfg.privacy.dp.level == "site"
    if site_dp:  # Flower's DP noise is calibrated to an unweighted mean of the sites' updates
        from common.privacy import UNIT_WEIGHT

        kwargs["weighted_by_key"] = UNIT_WEIGHT
    strategy = _tapped(BASES[name])(**kwargs)
    strategy.coord, strategy.model_name = coord, model_name

    initial = coord.initial_arrays()
    model = build_model(cfg.model.model_copy(update={"weights": None}), coord.n_outputs())
    bn_keys = frozenset(k for k in model.state_dict() if is_batchnorm_key(k, model))
    if name == "fedbn":
        # FedBN: BatchNorm parameters and buffers never leave a site; the server holds the rest.
        initial = ArrayRecord({k: v for k, v in initial.items() if k not in bn_keys})
    else:
        strategy.buffer_keys = frozenset(k for k in bn_keys if not k.endswith((".weight", ".bias")))
    extra = {P.LOCAL_EPOCHS: cfg.train.local_epochs, P.KEEP_LOCAL_BN: name == "fedbn",
             P.MODEL: model_name}
    runner = strategy
    if site_dp:  # Flower's DifferentialPrivacy*Clipping wrapper (server/strategies/site_dp.py)
        from common.privacy import ADAPTIVE_KEY
        from server.strategies.site_dp import wrap

        runner = wrap(strategy, coord, model_name, sites, max(int(n * cfg.strategy.fraction), min_sites))
        extra[ADAPTIVE_KEY] = cfg.privacy.dp.clipping == "adaptive"  # which clipping mod at a site

    done = coord.finished_model(model_name)  # leave-one-site-out: finished before a resume
    if done is not None:
        return [done]
    start = 0
    saved = coord.resume_of(model_name)
    if saved is not None:
        # --resume: the weights after round k and, for FedAdam/FedYogi, the server moments; the
        # sites derive each round's seed from the round number, so rounds k+1.. replay exactly.
        start, initial = int(saved["round"]), ArrayRecord(saved["arrays"])
        strategy.round_offset = start
        if "m_t" in saved:
            strategy.m_t = {k: v.numpy() for k, v in saved["m_t"].items()}
            strategy.v_t = {k: v.numpy() for k, v in saved["v_t"].items()}
        if start >= cfg.strategy.rounds:
            return [Trained(model_name, initial, list(sites), local_bn=name == "fedbn")]
        coord.restore_rng()  # Flower samples nodes with python's random

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round > 0:
            rnd = server_round + start
            coord.end_round(rnd, cfg.strategy.rounds, arrays, label, trained_on=sites)
            state = {"round": rnd, "arrays": arrays.to_torch_state_dict()}
            if getattr(strategy, "m_t", None):  # FedOpt's server moments (float64, kept as is)
                state["m_t"], state["v_t"] = dict(strategy.m_t), dict(strategy.v_t)
            coord.save_state(model_name, state, f"round {rnd}/{cfg.strategy.rounds} of {model_name}")
        return None

    result = runner.start(grid=grid, initial_arrays=initial, num_rounds=cfg.strategy.rounds - start,
                            timeout=cfg.strategy.round_timeout,
                            train_config=coord.config_record(**extra),
                            evaluate_config=coord.config_record(**{P.SPLIT: "val", **extra}),
                            evaluate_fn=after_round)
    return [Trained(model_name, result.arrays, list(sites), local_bn=name == "fedbn")]
