"""`CoordinatorTap`: what ChestFed adds to a Flower strategy class, as a mixin.

Each federated strategy (fedavg.py, fedprox.py, fedadam.py, fedyogi.py, fedbn.py) is declared as
`class FedX(CoordinatorTap, flwr's FedX)`: Flower's class does the sampling and the aggregation
as it is; the tap, first in the method order, wraps its four round methods to
  - hand the round's learning rate to the sites under `train.lr_schedule: plateau`;
  - record every site's training and validation numbers (Flower's aggregate would average them
    away), its dropouts and rejoins, under the site's name;
  - sort the replies by site, so the weighted mean is the same bits on every rerun;
  - skip the evaluation rounds `eval.every` does not ask for;
  - carry a round's validation in the next round's training message and reply
    (eval.round_validation: with_training, `carry_validation`), holding the round's end
    (its record, checkpoint and resume state: `finish_round`) until those numbers are in;
  - count rounds from where a resumed run left off (`round_offset`).
Set `fed` (the run's parts, federation.py) and `model_name` on an instance before it runs
(flower_loop.py does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from chestfed.common import protocol as P
from chestfed.server.federation.federation import Federation


def cast_like(arrays: ArrayRecord, dtypes: Mapping[str, np.dtype]) -> ArrayRecord:
    """Cast aggregated arrays back to the sites' dtypes: server optimisers compute in float64
    (and averaging turns int64 counters into floats), which would double every message."""
    out = ArrayRecord()
    for k, arr in arrays.items():
        want, a = dtypes.get(k), arr.numpy()
        out[k] = Array(a.astype(want) if want is not None and a.dtype != want else a)
    return out


@dataclass
class _Carried:
    """A round whose validation rides in the next training reply: its weights (best_val keeps
    them if best) and its end (`finish_round`), run once the numbers are in."""
    round: int
    arrays: ArrayRecord
    done: Callable[[], None] | None = None


class CoordinatorTap:
    """Mixin for a Flower strategy class (it must come first among the bases)."""

    fed: Federation
    model_name: str
    # BatchNorm running statistics (buffers, not trainable weights) of the model
    buffer_keys: frozenset[str] = frozenset()
    # True for server optimisers (FedAdam, FedYogi): they step the trainable weights only, and
    # the buffers get the sites' plain weighted mean, as under FedAvg.
    buffers_by_mean: bool = False
    round_offset: int = 0  # resume: Flower counts from 1 again, the experiment from k+1
    _train_msgs: tuple[Message, ...] = ()
    # A personalised method (ditto.py, fedper.py, fedrep.py): its name, whether the averaged
    # model is a whole model to score (`<method>-global`), and what its train messages add.
    personal: str = ""
    has_global: bool = True
    # eval.round_validation with_training, where it applies (validation.py `carried`): rounds
    # before `last_round` validate in the next round's training message (one exchange a round)
    carry_validation: bool = False
    last_round: int = 0
    _carried: _Carried | None = None

    @staticmethod
    def options(strategy: Any) -> dict[str, Any]:
        """Settings of Flower's class beyond those every strategy gets (flower_loop.py)."""
        return {}

    @staticmethod
    def site_settings(strategy: Any) -> dict[str, Any]:
        """Settings a site needs for this method (sites/personal.py), in every message."""
        return {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        fed = getattr(self, "fed", None)  # (tests drive a bare strategy without one)
        extra = fed.validation.lr_config(self.model_name) if fed is not None else {}  # lr_schedule plateau
        if self._carried is not None:  # the arrays are the previous round's: score them first
            extra[P.VALIDATE] = True
        if extra:
            config = ConfigRecord({**dict(config.items()), **extra})
        msgs = list(super().configure_train(server_round + self.round_offset, arrays, config,  # type: ignore[misc]
                                            grid))
        self._train_msgs = tuple(msgs)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        carried, self._carried = self._carried, None
        if carried is not None:  # the previous round's validation first, then its end
            loss = self.fed.record.record_eval(carried.round, replies, self.model_name,
                                               record=P.VALIDATION)
            self.fed.validation.after_validation(carried.round, self.model_name, loss,
                                                 carried.arrays)
            if carried.done is not None:
                carried.done()
        good = self._record_replies(server_round, replies)
        # the sites' dtypes, read before aggregating: Flower's FedMedian / FedTrimmedAvg pop
        # the arrays out of the replies as they go
        reference = {k: a.numpy().dtype for k, a in good[0].content[P.ARRAYS].items()} if good else {}
        arrays, metrics = super().aggregate_train(server_round, good)  # type: ignore[misc]
        if arrays is not None and self.buffers_by_mean and self.buffer_keys:
            # A server Adam/Yogi step on a BatchNorm running variance can push it below zero:
            # the buffers take the sites' weighted mean instead (Flower's own FedAvg
            # aggregation, of the same replies and weights the optimiser's mean was taken from).
            mean = aggregate_arrayrecords([r.content for r in good], self.weighted_by_key)  # type: ignore[attr-defined]
            for k in self.buffer_keys:
                arrays[k] = mean[k]
        if arrays is not None and reference:
            arrays = cast_like(arrays, reference)
        return arrays, metrics

    def _record_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Record the round's replies and dropouts; return the good replies in site order."""
        # A site that went away: the SuperLink answers for it (src = the SuperLink, not the
        # node) once its heartbeat lapses; or nothing comes back within round_timeout.
        # Either way the dropout is recorded under the site's name.
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in self._train_msgs}
        record = self.fed.record
        site = self.fed.sites.site_of
        kept, answered, by_site = [], set(), {}
        for r in replies:
            node = r.metadata.src_node_id
            if node not in site and r.metadata.reply_to_message_id in dst:
                node = dst[r.metadata.reply_to_message_id]
                record.dropouts.append({"round": server_round, "site": site.get(node, str(node)),
                                        "reason": r.error.reason if r.has_error() else "?"})
            else:
                kept.append(r)
            answered.add(node)
            by_site[site.get(node, str(node))] = r
        # a console line when a site drops out, and when it answers again
        self.fed.sites.note_presence([site.get(n, str(n)) for n in dst.values()], by_site)
        for node in dst.values():
            if node not in answered:
                record.dropouts.append({"round": server_round, "site": site.get(node, str(node)),
                                        "reason": "no reply within strategy.round_timeout"})
        # Replies in site order: the weighted average is then the same bits on every rerun.
        kept.sort(key=lambda r: site.get(r.metadata.src_node_id, ""))
        return record.record_train(server_round, kept, self.model_name, expected=len(dst) or None)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.fed.validation.due(server_round):
            return []
        if self.carry_validation and server_round < self.last_round:
            self._carried = _Carried(server_round, arrays)  # next round's training validates
            return []
        self._eval_arrays = arrays  # eval.checkpoints best_val keeps them if best
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def finish_round(self, server_round: int, done: Callable[[], None]) -> None:
        """Run a round's end (`done`: its record, checkpoint and resume state) now, or, when its
        validation rides in the next training reply, once that has arrived: the round's rows
        and the validation schedule's state are then complete when they are written, and a
        resumed run restarts after a round whose validation is known."""
        carried = self._carried
        if carried is not None and carried.round == server_round + self.round_offset:
            carried.done = done
        else:
            done()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        if self._carried is not None and self._carried.round == rnd:
            return None  # validated in the next round's training
        loss = self.fed.record.record_eval(rnd, replies, self.model_name)
        self.fed.validation.after_validation(rnd, self.model_name, loss,
                                             getattr(self, "_eval_arrays", None))
        return None  # per-site numbers are what matter; they are recorded above
