"""Writing a file so that a crash never leaves one that looks complete: a temporary name in
the same folder, then one rename. The only place in ChestFed that renames files into place
(tests/test_layout.py holds every other module to that), so the rules live once:

- the temporary file sits beside the final one (a rename is atomic only within one file system);
- it gets the mode a plain `open()` would give under the umask (mkstemp's 0600 would hide
  results from colleagues), or 0600 from its creation for a secret (a key is never readable);
- it is removed if writing fails or is interrupted, and the old file stays as it was.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()


def jsonable(x: Any) -> Any:
    """NaN and inf become null (strict JSON readers, browsers and jq, reject NaN); numpy and
    torch scalars become numbers; keys become strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return jsonable(x.item())
    return x


def write_with(path: str | os.PathLike[str], write: Callable[[str], None], *,
               secret: bool = False, suffix: str = "") -> Path:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one
    rename. `suffix` keeps an extension a writer goes by (PIL picks the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)  # mkstemp made it 0600: right for a secret, and chmod-ed below otherwise
    try:
        write(tmp)
        if not secret:
            os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes, *, secret: bool = False) -> Path:
    def put(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file

    return write_with(path, put, secret=secret)


def write_text(path: str | os.PathLike[str], text: str, *, secret: bool = False) -> Path:
    return write_bytes(path, text.encode(), secret=secret)


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> Path:
    """`obj` as JSON (NaN as null), a newline at the end."""
    return write_text(path, json.dumps(jsonable(obj), indent=indent, default=default) + "\n")


def torch_save(path: str | os.PathLike[str], obj: Any) -> Path:
    import torch  # here, not at the top: launchers that fail early should not wait for torch

    return write_with(path, lambda tmp: torch.save(obj, tmp))


def replace_folder(tmp: str | os.PathLike[str], final: str | os.PathLike[str],
                   complete: Callable[[Path], bool]) -> bool:
    """Move a finished folder `tmp` to `final` in one rename. When `final` is already there
    (another process built the same folder first) and `complete(final)`, `tmp` is dropped and
    False returned; an incomplete `final` (a crash left it) is replaced."""
    try:
        os.replace(tmp, final)
        return True
    except OSError:  # a non-empty folder cannot be replaced by a rename
        if complete(Path(final)):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return True
