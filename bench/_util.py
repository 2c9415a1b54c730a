"""Shared helpers for the benchmarks: timed subprocesses, process-tree memory, JSON results.

Every benchmark reports ratios measured within one run (the machine is shared and noisy), so
the helpers here time commands side by side and record the load average next to each figure.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from chestfed.common.atomic import write_json

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# --- process-tree memory -------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Ray's GCS, raylet, workers and actors included)."""
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, in seconds (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        return None


def process_kind(pid: int, root: int) -> str:
    """A short name for what a process in a simulation's tree is."""
    if pid == root:
        return "launcher"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for needle, kind in (("ClientAppActor", "ray actor (site worker)"), ("gcs_server", "ray gcs"),
                         ("raylet/raylet", "ray raylet"), ("ray::IDLE", "ray idle worker"),
                         ("default_worker.py", "ray idle worker"), ("DashboardAgent", "ray agents"),
                         ("RuntimeEnvAgent", "ray agents"), ("dashboard", "ray dashboard"),
                         ("log_monitor", "ray monitors"), ("monitor.py", "ray monitors"),
                         ("wandb", "wandb"), ("--plain", "plain loop")):
        if needle in cmd:
            return kind
    return "other"


class MemorySampler:
    """Samples the process tree under `pid` every `interval` s in a thread.

    Keeps the peak summed PSS (every `pss_every` samples) and RSS (and which processes made the
    PSS peak, by kind) and the CPU
    time of every process ever seen (utime + stime; a process that exits keeps its last value),
    as a time series so a phase's CPU seconds can be read off between two timestamps.
    """

    def __init__(self, pid: int, interval: float = 0.5, t0: float | None = None,
                 pss_every: int = 6):
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.t0 = time.perf_counter() if t0 is None else t0
        self.peak = {"rss_mb": 0.0, "pss_mb": 0.0, "processes": 0}
        self.peak_breakdown: dict[str, float] = {}
        self.cpu_kind_series: list[tuple[float, dict[str, float]]] = []  # (t, CPU s per kind)
        self._cpu: dict[int, float] = {}
        self._kind: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, with_pss: bool = True) -> None:
        """One sample; PSS (smaps_rollup walks page tables: ~15 ms per large process) only
        when `with_pss`, RSS and CPU time always."""
        pids = descendants(self.pid)
        rss = pss = 0.0
        by_kind: dict[str, float] = {}
        for p in pids:
            rss += _kib(f"/proc/{p}/status", "VmRSS:") / 1024
            if with_pss:
                v = _kib(f"/proc/{p}/smaps_rollup", "Pss:") / 1024
                pss += v
                kind = process_kind(p, self.pid)
                by_kind[kind] = by_kind.get(kind, 0.0) + v
            c = _cpu_seconds(p)
            if c is not None:
                self._cpu[p] = c
                if p not in self._kind or self._kind[p] == "ray idle worker":  # actors start as IDLE
                    self._kind[p] = process_kind(p, self.pid)
        kinds: dict[str, float] = {}
        for p, c in self._cpu.items():
            kinds[self._kind[p]] = kinds.get(self._kind[p], 0.0) + c
        self.cpu_kind_series.append((time.perf_counter() - self.t0, kinds))
        if with_pss and pss > self.peak["pss_mb"]:
            self.peak_breakdown = {k: round(v, 1) for k, v in sorted(by_kind.items())}
            self.peak["pss_mb"] = pss
        self.peak["rss_mb"] = max(self.peak["rss_mb"], rss)
        self.peak["processes"] = max(self.peak["processes"], len(pids))

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.sample(with_pss=i % self.pss_every == 0)
            i += 1
            self._stop.wait(self.interval)

    def _kinds_at(self, t: float) -> dict[str, float]:
        """CPU seconds per process kind at time t (s from t0), from the nearest earlier sample."""
        best: dict[str, float] = {}
        for ts, kinds in self.cpu_kind_series:
            if ts > t:
                break
            best = kinds
        return best

    def cpu_at(self, t: float) -> float:
        """Total CPU seconds of the tree at time t (s from t0)."""
        return sum(self._kinds_at(t).values())

    def cpu_by_kind(self, t_from: float, t_to: float) -> dict[str, float]:
        """CPU seconds per process kind between two times (s from t0)."""
        a, b = self._kinds_at(t_from), self._kinds_at(t_to)
        return {k: round(b[k] - a.get(k, 0.0), 2) for k in sorted(b)}

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --- timed commands --------------------------------------------------------------------------------


def run_timed(cmd: Sequence[str], marks: dict[str, str] | None = None, env: dict[str, str] | None = None,
              memory: bool = False, echo: bool = False, timeout: float | None = None,
              pss_every: int = 6) -> dict[str, Any]:
    """Run `cmd`, timestamping its output lines.

    `marks` maps a name to a regex; the result's `marks[name]` is the time (s from launch) of
    the first output line matching it. Returns wall time, marks, exit code, the output and,
    with `memory`, the peak memory and the CPU seconds of the whole process tree (sampled every
    0.5 s; PSS every `pss_every` samples, as reading it costs ~15 ms per large process).
    """
    marks = marks or {}
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=full_env)
    sampler = MemorySampler(proc.pid, t0=t0, pss_every=pss_every) if memory else None
    if sampler:
        sampler.__enter__()
    seen: dict[str, float] = {}
    lines: list[tuple[float, str]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter() - t0
            lines.append((t, line.rstrip("\n")))
            if echo:
                print(f"    [{t:6.1f}s] {line.rstrip()}", flush=True)
            for name, rx in marks.items():
                if name not in seen and re.search(rx, line):
                    seen[name] = t
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        if sampler:
            sampler.__exit__()
    wall = time.perf_counter() - t0
    out = {"cmd": " ".join(cmd), "wall_s": wall, "marks": seen, "returncode": proc.returncode,
           "lines": lines}
    if sampler:
        out["peak_memory"] = {**sampler.peak, "pss_by_kind_mb": sampler.peak_breakdown}
        out["cpu_s"] = sampler.cpu_at(float("inf")) if sampler.cpu_kind_series else None
        out["sampler"] = sampler
    if proc.returncode != 0:
        tail = "\n".join(line for _, line in lines[-30:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return out


# --- results ----------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(),
                            "loadavg_1m": os.getloadavg()[0],
                            "git_commit": _git("rev-parse", "--short", "HEAD"),
                            # code and configs only: a result file an earlier benchmark of the
                            # same session wrote is not a change to what is measured
                            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no",
                                                   "--", ".", ":!bench/results"))}
    try:
        import importlib.metadata as md

        for pkg in ("torch", "flwr", "ray", "numpy"):
            info[pkg] = md.version(pkg)
    except Exception:  # noqa: BLE001
        pass
    return info


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>.json, atomically (temporary name, then rename)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    dest = RESULTS / f"{name}.json"
    blob = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "machine": machine(), **payload}
    return write_json(dest, blob, default=_plain)


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON: {type(x)}")


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    body = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def site_overrides(n_sites: int | None = None, size_scale: float = 1.0,
                   total_images: int | None = None) -> dict[str, Any]:
    """A config tree (dict) of phantom sites cycling the presets a, b, c.

    `n_sites` None keeps the default three sites; `total_images` spreads that many images evenly
    over the sites (the scale benchmark), otherwise each preset's size x `size_scale`.
    """
    import yaml

    from chestfed.common.config import DEFAULT_CONFIG
    from chestfed.sites.phantom.spec import load_preset

    tree = yaml.safe_load(DEFAULT_CONFIG.read_text())
    base = tree["sites"]
    if n_sites is not None:
        base = [{"name": f"site{i:02d}", "kind": "phantom",
                 "options": {"preset": "abc"[i % 3], "seed": 1000 + i}} for i in range(n_sites)]
    sites = []
    for s in base:
        opts = dict(s.get("options", {}))
        preset_size = int(load_preset(opts.get("preset", "a"))["population"]["size"])
        if total_images is not None:
            size = max(20, total_images // len(base))
        else:
            size = int(round(preset_size * size_scale))
        if size != preset_size:
            opts["population"] = {**opts.get("population", {}), "size": size}
        sites.append({**s, "options": opts})
    tree["sites"] = sites
    return tree


def write_config(tree: dict[str, Any], path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def warm_cache(config: Path) -> float:
    """Build every site's image cache once, so no timed run pays the first-time decode."""
    from chestfed.common.config import load_config
    from chestfed.sites.data import load_site

    t0 = time.perf_counter()
    cfg = load_config(config)
    for s in cfg.sites:
        load_site(cfg, s, progress=False)
    return time.perf_counter() - t0
