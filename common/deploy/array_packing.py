"""A message's weights as one Array on the wire (deployment only).

Flower 1.41 moves a message's content as separate objects, one request and one SuperLink
database write each: an ArrayRecord of N tensors is N Arrays plus their chunks, so a training
message of the default 4-block CNN (26 tensors) costs ~55 object pushes and pulls per hop, each
through TLS, node authentication and SQL (measured with py-spy: `push_object` /
`pull_object` and their SQL were most of the SuperLink's CPU, which shares the cores with the
sites' training in a loopback deployment). Packing each ArrayRecord into one Array of the same
bytes (each tensor's serialized data, back to back) makes that a few objects per message.

It is lossless (the same dtype, shape, stype and bytes come out, in the same order) and
invisible to both ends' code: the coordinator's grid packs what it sends and unpacks what it
receives (server/deploy/packed_grid.py); a site's forwarder (sites/deploy/forwarder.py) unpacks
a message before the ClientApp sees it and packs the reply when the message came packed. The
wire and egress audits describe the messages as the strategies and the ClientApp see them.
"""
from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

LAYOUT = "chestfed.packed-arrays"  # ConfigRecord: {record name: the packed tensors' layout, JSON}
STYPE = "chestfed.packed"  # the packed Array's stype: bytes of several serialized Arrays


def pack(content: RecordDict) -> RecordDict:
    """`content` with every ArrayRecord of more than one Array as a single Array (the other
    records are the same objects); unchanged when there is nothing to pack."""
    if LAYOUT in content:
        raise ValueError(f"a message already holds a '{LAYOUT}' record")
    layouts: dict[str, str] = {}
    out = RecordDict()
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord) and len(rec) > 1:
            parts, layout = [], []
            for key, arr in rec.items():
                parts.append(arr.data)
                layout.append([key, arr.dtype, list(arr.shape), arr.stype, len(arr.data)])
            blob = b"".join(parts)
            out[name] = ArrayRecord({"packed": Array("uint8", (len(blob),), STYPE, blob)})
            layouts[name] = json.dumps(layout)
        else:
            out[name] = rec
    if not layouts:
        return content
    out[LAYOUT] = ConfigRecord(layouts)
    return out


def is_packed(content: RecordDict) -> bool:
    return LAYOUT in content


def unpack(content: RecordDict) -> RecordDict:
    """The content `pack` was given (as is when it was not packed)."""
    if LAYOUT not in content:
        return content
    layouts: Any = content[LAYOUT]
    out = RecordDict()
    for name, rec in content.items():
        if name == LAYOUT:
            continue
        if name in layouts:
            blob, pos, arrays = rec["packed"].data, 0, {}
            for key, dtype, shape, stype, n in json.loads(str(layouts[name])):
                arrays[key] = Array(str(dtype), tuple(int(s) for s in shape), str(stype),
                                    blob[pos:pos + n])
                pos += n
            if pos != len(blob):
                raise ValueError(f"packed record '{name}': {len(blob) - pos} bytes left over")
            out[name] = ArrayRecord(arrays)
        else:
            out[name] = rec
    return out
