"""Decode a site's images once into a memory-mapped uint8 array at the configured size.

Layout: `<cache_dir>/<site>-<key>/images.u8` ([N, S, S] uint8), `ok.npy` (which images decoded),
`bad_images.csv` (what failed and why), `done.json` (written last: a folder without it is
incomplete and rebuilt). The key hashes the source fingerprint and the preprocessing, so a change
to either builds a new cache and a second run with the same settings decodes nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import json
import logging
import mmap
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from chestfed.common.atomic import replace_folder
from chestfed.sites.adapters.base import SiteAdapter, SiteDataError
from chestfed.sites.decode import decode_chunk, decode_chunk_in_worker, fit_to_square, init_worker

__all__ = ["CacheView", "CachedImages", "build_or_load", "cache_key", "fit_to_square"]

log = logging.getLogger(__name__)
CACHE_VERSION = 1
_PARALLEL_MIN = 256  # below this, worker start-up costs more than it saves
# Decode workers start fresh (spawn), not forked from this process: a fork would inherit the
# caller's whole heap (torch, the site's records), which summed memory counts once per worker and
# which the child's garbage collector turns into private copies page by page as it touches
# objects; and forking a process whose torch/OpenMP threads are running is unsafe. A spawned
# worker imports sites/decode.py (numpy, Pillow) and the adapter's reader, never torch
# (bench/large_site.py measures the tree's memory).
_WORKER_START = "spawn"


@dataclass
class CachedImages:
    images: np.ndarray  # memmap [N, S, S] uint8
    ok: np.ndarray  # bool [N]
    path: Path
    built: bool  # True if this call decoded images, False if it reused the cache


class CacheView:
    """Rows `rows` of a memory-mapped cache, read a batch at a time: a split of a site.

    The cache file is mapped, never copied: every process that loads the site (the launcher,
    each Ray site worker) shares the same pages of the OS page cache, and a 100,000-image site
    costs no private memory per worker. Indexing (an int, a slice, an index array or tensor)
    returns a uint8 torch tensor [.., S, S] of just those images, read in file order. Anything
    else a tensor has (`.float()`, `.numpy()`, ...) reads the whole split into memory first:
    for tools and tests, not the training path.
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray) -> None:
        self._images = images
        self._rows = np.asarray(rows, dtype=np.int64)
        self.shape = torch.Size((len(self._rows), *images.shape[1:]))
        self.dtype = torch.uint8
        mapping = getattr(images, "_mmap", None)  # np.memmap's mmap.mmap; None for an array
        self._mapping = mapping if hasattr(mapping, "madvise") else None

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.numpy()
        rows = self._rows[key]
        if np.ndim(rows) == 0:
            one = np.array(self._images[int(rows)])
            self._release_pages()
            return torch.from_numpy(one)
        order = np.argsort(rows, kind="stable")  # sequential reads; the page cache likes them
        out = np.empty((len(rows), *self._images.shape[1:]), dtype=np.uint8)
        out[order] = self._images[rows[order]]
        self._release_pages()
        return torch.from_numpy(out)

    def _release_pages(self) -> None:
        """Unmap from this process the cache pages just read (they stay in the OS page cache).

        Pages of a mapped file that a process has read stay in its resident set (RSS) until it
        unmaps them, and the kernel maps them in large folios (up to MBs for one 4 kB row), so
        an epoch over a 100,000-image site would add the whole cache file to every worker's RSS
        (measured: 390 MB after 300 random batches; 11 GB for CheXpert at 224 px). That memory is
        the page cache, shared and reclaimable, but schedulers that police RSS (Slurm's job
        accounting, watchdogs) count it once per process. MADV_DONTNEED on a read-only file
        mapping drops only the mapping: the next read maps the cached pages again (a minor fault,
        no disk read). Measured cost: ~0.1 ms per batch, against ~100 ms to train on one.
        """
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED)

    def tensor(self) -> torch.Tensor:
        """The whole split in memory (a copy)."""
        return self[slice(None)]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.tensor(), name)


def cache_key(adapter: SiteAdapter, n: int, size: int, policy: str) -> str:
    blob = json.dumps([CACHE_VERSION, adapter.fingerprint(), n, size, policy])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_or_load(adapter: SiteAdapter, image_ids: list[str], size: int, policy: str,
                  cache_dir: str | os.PathLike[str], workers: int = 1,
                  on_bad_image: str = "skip", progress: bool = True,
                  warn_bad: bool = True) -> CachedImages:
    """The site's cache: found complete, or built (a progress bar unless `progress` is False).

    warn_bad: log a warning naming bad_images.csv when the build skipped images (the launchers'
    `build_caches` says so in its own line instead).
    """
    n = len(image_ids)
    root = Path(cache_dir).expanduser()
    final = root / f"{adapter.name}-{cache_key(adapter, n, size, policy)}"
    if (final / "done.json").is_file():
        images = np.memmap(final / "images.u8", dtype=np.uint8, mode="r", shape=(n, size, size))
        ok = np.load(final / "ok.npy")
        _check_bad(final, ok, on_bad_image, adapter.name)
        return CachedImages(images, ok, final, built=False)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter.name}-", dir=root))
    try:
        # Written through a file handle, a chunk at a time (not a writable memmap, whose dirty
        # pages would all count against this process): memory stays bounded at any n.
        out = open(tmp / "images.u8", "wb")
        out.truncate(max(n, 1) * size * size)
        mm = _RowWriter(out, size)
        ok = np.zeros(n, dtype=bool)
        bad: list[tuple[str, str]] = []
        reader = adapter.worker_reader()
        # On a terminal only (disable=None): in a log file the bar's redraws are noise.
        bar = tqdm(total=n, desc=f"caching {adapter.name}", unit="img",
                   disable=None if progress else True, leave=False)
        chunks = [list(range(s, min(s + 64, n))) for s in range(0, n, 64)]
        if workers > 1 and n >= _PARALLEL_MIN:
            reader_file = tmp / "reader.pickle"  # sites/decode.py says why a file
            with open(reader_file, "wb") as f:
                pickle.dump(reader, f, protocol=pickle.HIGHEST_PROTOCOL)
            with ProcessPoolExecutor(max_workers=workers, initializer=init_worker,
                                     initargs=(str(reader_file),),
                                     mp_context=multiprocessing.get_context(_WORKER_START)) as pool:
                with _parent_main_not_rerun(reader):  # the workers start inside map()
                    results = pool.map(decode_chunk_in_worker, chunks, [size] * len(chunks),
                                       [policy] * len(chunks))
                try:
                    _collect(results, mm, ok, bad, image_ids, bar, on_bad_image, adapter.name)
                except BrokenProcessPool as exc:
                    raise SiteDataError(
                        f"site '{adapter.name}': a cache-building worker process died ({exc}); "
                        "out of memory or killed; data.workers: 1 builds in this process"
                        ) from None
                except BaseException:
                    # on_bad_image=error (or Ctrl-C): stop now, not after decoding the rest.
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
            reader_file.unlink()
        else:
            results = (decode_chunk(reader, c, size, policy) for c in chunks)
            _collect(results, mm, ok, bad, image_ids, bar, on_bad_image, adapter.name)
        bar.close()
        out.close()
        np.save(tmp / "ok.npy", ok)
        pd.DataFrame(bad, columns=["image_id", "reason"]).to_csv(tmp / "bad_images.csv", index=False)
        (tmp / "done.json").write_text(json.dumps({"n": n, "size": size, "policy": policy,
                                                   "bad": len(bad), "site": adapter.name}))
        # atomic: another process may have finished first (its done.json says so)
        replace_folder(tmp, final, complete=lambda f: (f / "done.json").is_file())
    except BaseException:
        if "out" in locals():
            out.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if bad and warn_bad:
        log.warning("site '%s': %d of %d images could not be read and are skipped (see %s)",
                    adapter.name, len(bad), n, final / "bad_images.csv")
    images = np.memmap(final / "images.u8", dtype=np.uint8, mode="r", shape=(n, size, size))
    return CachedImages(images, np.load(final / "ok.npy"), final, built=True)


@contextlib.contextmanager
def _parent_main_not_rerun(reader: Any) -> Iterator[None]:
    """While workers start: spawn them without re-running this process's main script in each.

    A spawned worker normally runs the parent's main script again (as `__mp_main__`) before it
    starts. For a launcher that means importing its top level once more (a script may have
    changed its own import path after it started), and for a user's script without an
    `if __name__ == '__main__':` guard, running the whole script again. The decode workers need
    none of it (sites/decode.py and the reader's module). multiprocessing skips that step when
    `__main__.__spec__` is named '__main__' (what `python -m package` gives), so it is named so while
    the workers start; not when the reader's class lives in the main script, which the workers then
    need in order to unpickle it.
    """
    main = sys.modules.get("__main__")
    if main is None or type(reader).__module__ == "__main__":
        yield
        return
    saved = getattr(main, "__spec__", None)
    main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        yield
    finally:
        main.__spec__ = saved


class _RowWriter:
    """`writer[i] = image` writes row i of the [N, S, S] uint8 file at its offset."""

    def __init__(self, f: Any, size: int) -> None:
        self.f, self.row = f, size * size

    def __setitem__(self, i: int, img: np.ndarray) -> None:
        self.f.seek(int(i) * self.row)
        self.f.write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())


def _collect(results, mm, ok, bad, image_ids, bar, on_bad_image, site) -> None:
    for chunk in results:
        for i, img, reason in chunk:
            if img is None:
                if on_bad_image == "error":
                    raise SiteDataError(f"site '{site}': image '{image_ids[i]}' cannot be read "
                                        f"({reason}); set data.on_bad_image: skip to skip it")
                bad.append((image_ids[i], reason))
            else:
                mm[i] = img
                ok[i] = True
            bar.update(1)


def _check_bad(folder: Path, ok: np.ndarray, on_bad_image: str, site: str) -> None:
    if on_bad_image == "error" and not ok.all():
        raise SiteDataError(f"site '{site}': {int((~ok).sum())} images cannot be read (see "
                            f"{folder / 'bad_images.csv'}); set data.on_bad_image: skip")
