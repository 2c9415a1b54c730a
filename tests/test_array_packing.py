"""A deployed message's weights as one Array on the wire (common/deploy/array_packing.py): lossless
both ways, through the coordinator's grid and a site's forwarder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from chestfed.common import protocol as P
from chestfed.common.deploy.array_packing import LAYOUT, is_packed, pack, unpack
from chestfed.server.deploy.packed_grid import PackedGrid
from chestfed.sites import app as site_app
from chestfed.sites.deploy import forwarder
from test_site_train import _task_identity  # noqa: F401  (an autouse fixture)
from test_warm_worker import _arrays, _cfg, _context, _train


def _content() -> RecordDict:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    state = net.state_dict()  # float32 weights and an int64 counter
    return RecordDict({"arrays": ArrayRecord(state), "model:b": ArrayRecord({"w": torch.ones(3, dtype=torch.float64)}),
                       "metrics": MetricRecord({"x": 1.0}), "config": ConfigRecord({"k": "v"})})


def test_packing_is_lossless_and_makes_one_array_per_record():
    content = _content()
    packed = pack(content)
    assert is_packed(packed) and len(packed["arrays"]) == 1
    assert packed["model:b"] is content["model:b"]  # one Array already: as it was
    assert packed["metrics"] is content["metrics"] and packed["config"] is content["config"]
    back = unpack(packed)
    assert LAYOUT not in back and list(back.keys()) == list(content.keys())
    for name in ("arrays", "model:b"):
        assert list(back[name].keys()) == list(content[name].keys())
        assert back[name].object_id == content[name].object_id  # same dtypes, shapes, bytes
    assert unpack(content) is content  # not packed: untouched
    nothing = RecordDict({"metrics": MetricRecord({"x": 1.0})})
    assert pack(nothing) is nothing and not is_packed(nothing)


def test_a_corrupt_packed_record_is_refused():
    packed = pack(_content())
    blob = packed["arrays"]["packed"]
    packed["arrays"] = ArrayRecord({"packed": Array("uint8", (len(blob.data) + 4,), blob.stype, blob.data + b"oops")})
    with pytest.raises(ValueError, match="bytes left over"):
        unpack(packed)


class _Grid:
    """Keeps what was pushed; answers each message with its own content."""

    def __init__(self):
        self.pushed = []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [str(i) for i in range(len(self.pushed))]

    def pull_messages(self, ids):
        from flwr.app import Message

        return [Message(RecordDict(dict(m.content.items())), reply_to=m) for m in self.pushed]


def test_the_coordinators_grid_packs_what_it_sends_and_unpacks_what_it_gets(tmp_path):
    cfg = _cfg(tmp_path)
    msg = _train(cfg)
    want = msg.content[P.ARRAYS].object_id
    grid = PackedGrid(_Grid())
    grid.push_messages([msg])
    assert is_packed(grid._grid.pushed[0].content) and len(msg.content[P.ARRAYS]) == 1
    (reply,) = grid.pull_messages(["0"])
    assert not is_packed(reply.content) and reply.content[P.ARRAYS].object_id == want


def test_a_site_answers_a_packed_message_as_an_unpacked_one_and_packs_its_reply(tmp_path):
    cfg = _cfg(tmp_path)
    msg = _train(cfg)
    msg.content = pack(msg.content)
    reply = forwarder.app(msg, _context(tmp_path))
    assert is_packed(reply.content)
    direct = site_app.app(_train(cfg), _context(tmp_path / "direct"))
    got = unpack(reply.content)
    assert list(got[P.ARRAYS].keys()) == list(direct.content[P.ARRAYS].keys())
    for a, b in zip(got[P.ARRAYS].to_numpy_ndarrays(), _arrays(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    # a message that came unpacked gets an unpacked reply (a coordinator that does not pack)
    assert not is_packed(forwarder.app(_train(cfg), _context(tmp_path / "plain")).content)
