#!/usr/bin/env python
"""One deployment round against one simulated round of the same work, in one run.

The same experiment (the embedded default's three phantom hospitals, fedavg, --rounds rounds,
per-round validation) runs twice: `launch/simulate.py` (Ray) and a real loopback deployment
(`launch/server.py` + three `launch/site.py`, TLS and node keys as a hospital runs it). Each
round's wall time is the coordinator's own `round_seconds` in metrics.jsonl; round 1 carries
start-up and is reported apart, the ratio uses the median of the later rounds.

The profile behind a deployment round: Flower 1.41's SuperNode runs every message in a new
`flwr-clientapp` process (subprocess isolation). With the warm site worker (launch/site.py's
default, sites/deploy/warm_worker.py) that process only loads the thin forwarder
(sites/deploy/forwarder.py) and the worker, which imported torch and the app once, does the work;
`--with-cold` also runs the deployment with `--no-warm-worker` (each message imports torch and the
app afresh), in the same run. The script measures the pieces: a fresh interpreter importing the
forwarder and the full ClientApp, and the ClientApp processes per round (messages per site per
round). `overhead_per_round_s` is the deployed minus the simulated later-round median.

    python bench/deploy_round.py [--rounds 3] [--with-cold] [--out deploy_round]

Writes bench/results/<out>.json and prints a short table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _util import table, write_result  # noqa: E402
from chestfed.common.deploy.supervision import TAG_ENV, free_port, stop_launchers  # noqa: E402

PY = sys.executable
SITES = ("clinic_a", "icu_b", "trauma_c")


def _certs_module():
    spec = importlib.util.spec_from_file_location("chestfed_certs_bench", REPO / "launch" / "certs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config(tmp: Path, rounds: int) -> Path:
    tree = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    tree["output_dir"] = str(tmp / "runs")
    tree["strategy"]["rounds"] = rounds
    tree["eval"] = {**tree.get("eval", {}), "every": 1, "bootstrap": 0, "report": False}
    tree["wandb"] = {"enabled": False, "mode": "disabled"}
    f = tmp / "bench.yaml"
    f.write_text(yaml.safe_dump(tree, sort_keys=False))
    return f


def round_seconds(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per: dict[int, float] = {}
    for r in rows:
        if "round_seconds" in r:
            per[int(r["round"])] = float(r["round_seconds"])
    return [per[k] for k in sorted(per)]


def site_train_seconds(run: Path) -> list[float]:
    """Per round, the slowest site's own training time (metrics.jsonl train_seconds): the part of
    a round that is compute at a site, not messaging."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per: dict[int, list[float]] = {}
    for r in rows:
        if "train_seconds" in r:
            per.setdefault(int(r["round"]), []).append(float(r["train_seconds"]))
    return [max(per[k]) for k in sorted(per)]


def worker_handling(tmp: Path) -> dict[str, float]:
    """Median seconds the warm workers took per message type (their worker.log lines)."""
    seen: dict[str, list[float]] = {}
    for log in tmp.glob("site-*/worker.log"):
        for line in log.read_text(errors="replace").splitlines():
            if " message answered in " in line:
                head, _, tail = line.partition(" message answered in ")
                seen.setdefault(head.split()[-1], []).append(float(tail.split()[0]))
    return {k: statistics.median(v) for k, v in sorted(seen.items())}


def only_run(root: Path) -> Path:
    runs = sorted(p.parent for p in root.glob("*/*/run.json"))
    if len(runs) != 1:
        raise SystemExit(f"expected one run folder under {root}, found {len(runs)}")
    return runs[0]


def simulate(cfg: Path, tmp: Path) -> tuple[Path, float]:
    t0 = time.perf_counter()
    p = subprocess.run([PY, str(REPO / "launch" / "simulate.py"), "--config", str(cfg),
                        "--strategy", "fedavg", f"output_dir={tmp / 'sim'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=3600,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    if p.returncode:
        raise SystemExit(f"simulate.py failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    return only_run(tmp / "sim"), time.perf_counter() - t0


def deploy(cfg: Path, tmp: Path, warm: bool = True
           ) -> tuple[Path, float, dict[str, int], dict[str, float]]:
    """(run folder, wall seconds, messages each site answered, the warm workers' median
    handling seconds per message type)."""
    tmp = tmp / ("warm" if warm else "cold")
    tmp.mkdir()
    certs_mod = _certs_module()
    certs, keys = tmp / "certs", tmp / "keys"
    certs_mod.make_server_cert(certs, ["localhost"])
    for s in SITES:
        certs_mod.make_node_key(keys, s)
    port = free_port()
    # One tag per launcher: a launcher ends every process carrying its tag when it stops, so a
    # tag shared by all four would let each site's exit end the coordinator (and the others).
    tags = {who: f"bench-deploy-{os.getpid()}-{who}" for who in (*SITES, "coordinator")}
    base = {**os.environ, "WANDB_MODE": "disabled"}
    procs = []
    try:
        for s in SITES:
            out = open(tmp / f"site-{s}.out", "wb")
            procs.append(subprocess.Popen(
                [PY, str(REPO / "launch" / "site.py"), "--name", s, "--config", str(cfg),
                 "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.pem"),
                 "--key", str(keys / s), "--retry-every", "2", "--workdir", str(tmp / f"site-{s}"),
                 *([] if warm else ["--no-warm-worker"])],
                stdout=out, stderr=subprocess.STDOUT, env={**base, TAG_ENV: tags[s]},
                start_new_session=True))
        t0 = time.perf_counter()
        server = subprocess.run(
            [PY, str(REPO / "launch" / "server.py"), "--config", str(cfg), "--strategy", "fedavg",
             "--certs", str(certs), "--keys-dir", str(keys), "--host", "127.0.0.1",
             "--port", str(port), "--state-dir", str(tmp / "coordinator"), "--join-timeout", "300",
             f"output_dir={tmp / 'deploy'}"],
            cwd=REPO, capture_output=True, text=True, timeout=3600,
            env={**base, TAG_ENV: tags["coordinator"]})
        wall = time.perf_counter() - t0
        if server.returncode:
            said = [ln for ln in server.stderr.splitlines() if ln.startswith("chestfed: ")]
            raise SystemExit(f"server.py failed ({server.returncode}): "
                             f"{said[-1:] or server.stderr.strip().splitlines()[-5:]}")
    finally:
        stop_launchers(procs, list(tags.values()), grace=5.0)
    # messages each site answered (one flwr-clientapp process each): from its egress log
    messages = {s: sum(1 for _ in open(tmp / f"site-{s}" / "egress.jsonl"))
                for s in SITES if (tmp / f"site-{s}" / "egress.jsonl").is_file()}
    return only_run(tmp / "deploy"), wall, messages, worker_handling(tmp)


def import_seconds(module: str, repeat: int = 3) -> float:
    """A fresh interpreter importing `module` (what each flwr-clientapp pays for its app)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", f"import {module}"], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--with-cold", action="store_true",
                   help="also deploy without the warm worker (--no-warm-worker), in the same run")
    p.add_argument("--out", default="deploy_round", help="file stem under bench/results/")
    p.add_argument("--keep", type=Path, default=None,
                   help="work in this (new) folder and keep it: the run folders, each site's "
                        "launcher output, worker.log and egress.jsonl, to read a round's timeline")
    args = p.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds: at least 2 (round 1 carries start-up)")
    load0 = os.getloadavg()[0]
    if args.keep is not None and args.keep.exists():
        raise SystemExit(f"--keep: {args.keep} exists; name a new folder")
    with tempfile.TemporaryDirectory(prefix="chestfed-deploy-round-") as t:
        tmp = Path(t)
        if args.keep is not None:
            tmp = args.keep.resolve()
            tmp.mkdir(parents=True)
        cfg = config(tmp, args.rounds)
        sim_run, sim_wall = simulate(cfg, tmp)
        dep_run, dep_wall, messages, handling = deploy(cfg, tmp)
        sim, dep = round_seconds(sim_run), round_seconds(dep_run)
        compute = {"simulation": site_train_seconds(sim_run), "deployment": site_train_seconds(dep_run)}
        cold = None
        if args.with_cold:
            cold_run, cold_wall, _, _ = deploy(cfg, tmp, warm=False)
            cold = {"round_seconds": round_seconds(cold_run), "wall_seconds": cold_wall,
                    "slowest_site_train_seconds": site_train_seconds(cold_run)}
        imp = import_seconds("chestfed.sites.app")
        imp_fwd = import_seconds("chestfed.sites.deploy.forwarder")
    sim_later, dep_later = statistics.median(sim[1:]), statistics.median(dep[1:])
    result = {
        "rounds": args.rounds,
        "load_average_start": load0, "load_average_end": os.getloadavg()[0],
        "simulation": {"round_seconds": sim, "wall_seconds": sim_wall},
        "deployment": {"round_seconds": dep, "wall_seconds": dep_wall,
                       "messages_per_site": messages, "warm_worker": True},
        "deployment_cold": cold,
        "overhead_per_round_s": dep_later - sim_later,
        "overhead_target_s": 12.0,
        "ratio_later_rounds": dep_later / sim_later,
        "ratio_round_1": dep[0] / sim[0],
        "ratio_wall": dep_wall / sim_wall,
        "target": 1.5,
        # how much of a round is the sites' own training (the slowest site per round): in this
        # benchmark the three sites share the same 2 cores in both modes
        "slowest_site_train_seconds": compute,
        "worker_handling_median_s": handling,
        "profile": {"import_sites_app_seconds": imp, "import_forwarder_seconds": imp_fwd,
                    "clientapp_processes_per_site_per_round":
                        (sum(messages.values()) / max(len(messages), 1)) / args.rounds if messages else None},
    }
    c_sim, c_dep = statistics.median(compute["simulation"][1:]), statistics.median(compute["deployment"][1:])
    rows = [("round 1 (s)", sim[0], dep[0], dep[0] / sim[0]),
            ("later rounds: slowest site's training", c_sim, c_dep, c_dep / c_sim),
            ("later rounds, median", sim_later, dep_later, dep_later / sim_later),
            ("whole command (s)", sim_wall, dep_wall, dep_wall / sim_wall)]
    if cold is not None:
        c_later = statistics.median(cold["round_seconds"][1:])
        rows.append(("cold worker: later rounds", sim_later, c_later, c_later / sim_later))
        result["overhead_per_round_cold_s"] = c_later - sim_later
    out = write_result(args.out, result)  # with the machine, commit and dirty flag
    print(table(rows, ["", "simulation", "deployment", "ratio"]))
    print(f"overhead per later round: {result['overhead_per_round_s']:.1f} s (target <= 12: "
          f"{'met' if result['overhead_per_round_s'] <= 12 else 'NOT met'}); ratio target 1.5: "
          f"{'met' if result['ratio_later_rounds'] <= 1.5 else 'NOT met'}")
    print(f"fresh import: ClientApp {imp:.1f} s, forwarder {imp_fwd:.1f} s; ClientApp processes per "
          f"site per round: {result['profile']['clientapp_processes_per_site_per_round']}; "
          f"wrote {out.relative_to(REPO)}")
    print("warm worker, median seconds per message: "
          + ", ".join(f"{k} {v:.1f}" for k, v in handling.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
