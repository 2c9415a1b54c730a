"""Every reply a site sends leaves through `send`, which first describes it (keys, dtypes,
shapes; never values) in the site's own egress log (common/privacy/disclosure.py `describe`)."""
from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from chestfed.common import protocol as P
from chestfed.common.privacy.disclosure import describe
from chestfed.sites import node

def egress_file(context: Context, site: str) -> Path | None:
    """Where this site logs what it sent: `<workdir>/egress.jsonl` (deployment, launch/site.py),
    `<egress-dir>/<site>.jsonl` (simulation: the run folder's egress/), else nowhere."""
    local = node.node_settings(context)
    if node.deployed(context):
        return Path(str(local["workdir"])) / "egress.jsonl" if local.get("workdir") else None
    return Path(str(local["egress-dir"])) / f"{site}.jsonl" if local.get("egress-dir") else None


def send(msg: Message, content: RecordDict, context: Context) -> Message:
    """Every reply leaves through here: it is described (keys, dtypes, shapes; never values) in
    this site's egress log (`egress_file`) before Flower takes it."""
    reply = Message(content=content, reply_to=msg)
    info = content.get(P.SITE_INFO)
    site = str(info.get("name", "")) if info is not None else ""
    conf = msg.content.get(P.CONFIG) if msg.has_content() else None
    if conf is not None and conf.get(P.SECAGG_INNER):
        return reply  # SecAgg+ masks it first; sites/privacy.py logs what then leaves
    log_egress(reply, context, site)
    return reply


def log_egress(reply: Message, context: Context, site: str) -> None:
    """One line in this site's egress log describing a reply that leaves (`egress_file`)."""
    # a simulated node answering the discovery's HELLO does not know its site's name yet
    path = egress_file(context, site or f"partition-{context.node_config.get('partition-id', '')}")
    if path is not None:
        row = describe(reply, "out")
        row["site"] = site
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def reply(msg: Message, metrics: dict[str, float], site: str, context: Context,
           arrays: ArrayRecord | None = None, reasons: dict[str, str] | None = None,
           batchnorm: str = "global", worker: dict[str, str] | None = None,
           validation: tuple[dict[str, float], dict[str, str], str] | None = None) -> Message:
    """A reply of numbers (and weights). `validation`: a training reply's carried validation of
    the weights it received (metrics, withheld reasons, BatchNorm used), as a ConfigRecord of
    its own: Flower's strategies expect exactly one MetricRecord in a training reply."""
    info = {"name": site, "batchnorm": batchnorm, **(worker or {}), **_reason_keys(reasons or {})}
    content = RecordDict({P.METRICS: MetricRecord(P.clean_metrics(metrics)),
                          P.SITE_INFO: ConfigRecord(info)})
    if arrays is not None:
        content[P.ARRAYS] = arrays
    if validation is not None:
        val, why, bn = validation
        content[P.VALIDATION] = ConfigRecord({**P.clean_metrics(val), **_reason_keys(why),
                                              "batchnorm": bn})
    return send(msg, content, context)


def _reason_keys(reasons: dict[str, str]) -> dict[str, str]:
    """Why a number was withheld (disclosure rules), as `reason:<metric>` entries."""
    return {f"reason:{k}": v for k, v in reasons.items()}
