"""How the reports write numbers: three decimals, n/a for what could not be computed (never a
made-up value), p-values below 0.001 as <0.001, mean ± sd, a value with its CI, and the † marks
of a flagged number (common/caveats.py)."""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

from chestfed.common import caveats as C
from chestfed.server.evaluation.matrix import num


def fmt(v: Any, digits: int = 3) -> str:
    x = num(v)
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def fmt_p(v: Any) -> str:
    x = num(v)
    if math.isnan(x):
        return "n/a"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def fmt_int(v: Any) -> str:
    x = num(v)
    return "n/a" if math.isnan(x) else str(int(round(x)))


def pm(mean: Any, sd: Any, digits: int = 3) -> str:
    m, s = num(mean), num(sd)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_ci(v: float, lo: float, hi: float) -> str:
    if math.isnan(v):
        return "n/a"
    if math.isnan(lo) or math.isnan(hi):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def flag_suffix(flags: Sequence[str] | None) -> str:
    """' †so' after a flagged number (common/caveats.py marks), '' otherwise."""
    m = C.marks(flags or [])
    return f" †{m}" if m else ""


def slug(text: str) -> str:
    """A file or anchor name made of text: letters, digits, '_', '.', '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"
