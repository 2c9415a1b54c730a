"""The knobs of a phantom site, as validated pydantic models.

Every section is one kind of dataset shift: `population` is prior shift (who comes to this
hospital, how often each finding occurs), `acquisition` is covariate shift (how the machine and
its processing make the image look), `labeller` is concept shift (what this hospital calls
positive, how noisy its labels are, what it does not annotate) and `shortcut` is a spurious
device that correlates with one finding at this site only.

`resolve_options()` turns a site's raw options dict (an optional `preset` plus overrides) into
one `PhantomOptions`, and turns pydantic's errors into one-line messages naming the bad key.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chestfed.common.config.errors import fields_at
from chestfed.common.errors import ChestFedError
from chestfed.common.labels import NO_FINDING, LabelError, finding_index

# The findings the phantom draws; the order is also the order of the random streams, so do not
# reorder (it would change every site's images).
MODELLED: tuple[str, ...] = (
    "Cardiomegaly", "Effusion", "Consolidation", "Pneumonia", "Nodule", "Mass",
    "Atelectasis", "Pneumothorax", "Edema",
)
DEVICES: tuple[str, ...] = ("chest_drain", "pacemaker", "marker")
PRESETS: tuple[str, ...] = ("a", "b", "c")
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "sites"

# Characters the burned-in text marker can draw (the renderer's built-in 5x7 font).
MARKER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 -.")


class PhantomOptionError(ChestFedError):
    """A phantom site option that is unknown or out of range."""


def _check_finding(name: str, *, modelled: bool) -> str:
    """Validate a finding name against the common label space (did-you-mean on typos)."""
    try:
        finding_index(name)
    except LabelError as e:
        # The label-space message also lists every finding; the phantom's own list is shorter.
        first = str(e).split(";")[0]
        raise ValueError(f"{first}; the phantom models: {', '.join(MODELLED)}" if modelled else first) from None
    if name == NO_FINDING:
        raise ValueError(f"'{NO_FINDING}' is derived from the other labels and cannot be set")
    if modelled and name not in MODELLED:
        raise ValueError(f"the phantom does not draw '{name}'; it models: {', '.join(MODELLED)}")
    return name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgeSpec(_Model):
    mean: float = Field(55.0, ge=0, le=120)
    sd: float = Field(15.0, ge=0, le=60)


class SeveritySpec(_Model):
    """Beta(alpha, beta) for the severity of a present finding (clipped into (0, 1])."""

    alpha: float = Field(2.0, gt=0)
    beta: float = Field(1.5, gt=0)


DEFAULT_PREVALENCE: dict[str, float] = {
    "Cardiomegaly": 0.15, "Effusion": 0.12, "Consolidation": 0.08, "Pneumonia": 0.08,
    "Nodule": 0.08, "Mass": 0.05, "Atelectasis": 0.12, "Pneumothorax": 0.05, "Edema": 0.08,
}


class PopulationSpec(_Model):
    size: int = Field(600, ge=1, le=1_000_000, description="number of images")
    patients: int | None = Field(None, ge=1, description="number of patients (wins over the ratio)")
    images_per_patient: float = Field(1.5, ge=1.0, description="used when `patients` is not given")
    age: AgeSpec = Field(default_factory=AgeSpec)
    female: float = Field(0.5, ge=0, le=1)
    ap_fraction: float = Field(0.2, ge=0, le=1, description="fraction of AP (vs PA) views")
    prevalence: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_PREVALENCE))
    severity: SeveritySpec = Field(default_factory=SeveritySpec)
    age_effect: float = Field(0.4, ge=0, le=3, description="log-odds per age SD (cardiomegaly; half for effusion, edema, mass)")
    persistence: float = Field(0.85, ge=0, le=1, description="chance a finding carries over between a patient's images")
    view_effect: float = Field(0.0, ge=0, le=6, description="log-odds of every finding on an AP image vs a PA one (0: view uninformative)")

    @field_validator("prevalence")
    @classmethod
    def _prevalence(cls, v: dict[str, float]) -> dict[str, float]:
        for name, p in v.items():
            _check_finding(name, modelled=True)
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"prevalence of '{name}' must be in [0, 1], got {p}")
        # Findings left out keep the default, so a preset can change one prevalence only.
        return {**DEFAULT_PREVALENCE, **{k: float(p) for k, p in v.items()}}

    @model_validator(mode="after")
    def _patients(self) -> "PopulationSpec":
        if self.patients is not None and self.patients > self.size:
            raise ValueError(f"patients ({self.patients}) cannot exceed size ({self.size})")
        return self

    def n_patients(self) -> int:
        if self.patients is not None:
            return self.patients
        return max(1, min(self.size, round(self.size / self.images_per_patient)))


class MarkerSpec(_Model):
    """A burned-in marker (lead letter or token) drawn into a corner of every image."""

    kind: Literal["none", "text", "square", "circle"] = "none"
    text: str = "L"
    position: Literal["top_left", "top_right", "bottom_left", "bottom_right"] = "top_right"
    size: float = Field(0.07, gt=0, le=0.3, description="height as a fraction of the image side")

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        v = v.upper()
        bad = sorted(set(v) - MARKER_CHARS)
        if bad or not v.strip():
            raise ValueError(f"marker text {v!r} must be 1+ of A-Z, 0-9, space, '-', '.'")
        if len(v) > 12:
            raise ValueError("marker text is at most 12 characters")
        return v


class AcquisitionSpec(_Model):
    """How the site's machine and post-processing turn the phantom into pixels."""

    gamma: float = Field(1.0, gt=0.1, le=5, description="contrast curve exponent on [0,1] intensity")
    contrast: float = Field(1.0, gt=0, le=5, description="slope around mid-grey")
    brightness: float = Field(0.0, ge=-1, le=1, description="offset added after the curve")
    noise: float = Field(0.01, ge=0, le=1, description="sd of additive pixel noise, [0,1] scale")
    blur: float = Field(0.3, ge=0, le=20, description="gaussian sigma in px at 256 px")
    collimation: float = Field(0.0, ge=0, le=0.3, description="max fraction blackened per border")
    rotation: float = Field(0.0, ge=0, le=45, description="max in-plane tilt, degrees")
    marker: MarkerSpec = Field(default_factory=MarkerSpec)

    @classmethod
    def plain(cls) -> "AcquisitionSpec":
        """The identity acquisition: the anatomical phantom as rendered, no noise, no blur."""
        return cls(gamma=1.0, contrast=1.0, brightness=0.0, noise=0.0, blur=0.0,
                   collimation=0.0, rotation=0.0, marker=MarkerSpec(kind="none"))


class LabellerSpec(_Model):
    """How this site's readers turn true severity into labels."""

    thresholds: dict[str, float] = Field(default_factory=dict)
    default_threshold: float = Field(0.3, ge=0, lt=1)
    noise: float = Field(0.02, ge=0, le=0.5, description="chance each annotated label is flipped")
    not_annotated: list[str] = Field(default_factory=list)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        for name, t in v.items():
            _check_finding(name, modelled=True)
            if not 0.0 <= float(t) < 1.0:
                raise ValueError(f"threshold of '{name}' must be in [0, 1), got {t}")
        return {k: float(t) for k, t in v.items()}

    @field_validator("not_annotated")
    @classmethod
    def _not_annotated(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_finding(name, modelled=False)
        return list(dict.fromkeys(v))

    def threshold(self, finding: str) -> float:
        return self.thresholds.get(finding, self.default_threshold)


class ShortcutSpec(_Model):
    """A device drawn into the image whose presence correlates with `finding` at this site."""

    finding: str
    device: Literal["chest_drain", "pacemaker", "marker"] = "chest_drain"
    p_if_positive: float = Field(0.8, ge=0, le=1, description="P(device | finding present)")
    p_if_negative: float = Field(0.02, ge=0, le=1, description="P(device | finding absent)")

    @field_validator("finding")
    @classmethod
    def _finding(cls, v: str) -> str:
        return _check_finding(v, modelled=True)


class PhantomOptions(_Model):
    population: PopulationSpec = Field(default_factory=PopulationSpec)
    acquisition: AcquisitionSpec = Field(default_factory=AcquisitionSpec)
    labeller: LabellerSpec = Field(default_factory=LabellerSpec)
    shortcut: ShortcutSpec | None = None
    seed: int = Field(0, ge=0, lt=2**63)


# --- resolving a site's options dict --------------------------------------------------------

def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` wins; nested dicts are merged key by key (lists and scalars are replaced)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_preset(preset: str) -> dict[str, Any]:
    """A preset name (a, b, c) or a path to a YAML file with the PhantomOptions structure."""
    name = str(preset)
    if name.lower() in PRESETS:
        path = PRESET_DIR / f"phantom_{name.lower()}.yaml"
    elif name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
    else:
        raise PhantomOptionError(
            f"phantom preset '{name}' is not known (choose one of {', '.join(PRESETS)}, or a YAML path)")
    if not path.is_file():
        raise PhantomOptionError(f"phantom preset file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PhantomOptionError(f"phantom preset file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PhantomOptionError(f"phantom preset file {path} must hold a mapping of options")
    return data


def explain(err: ValidationError) -> str:
    """One line naming the first bad key, from a PhantomOptions ValidationError."""
    # An unknown key usually explains the "missing" error next to it, so name it first.
    errors = sorted(err.errors(), key=lambda x: x["type"] != "extra_forbidden")
    e = errors[0]
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc) or "<options>"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if e["type"] == "extra_forbidden":
        known = fields_at(PhantomOptions, loc[:-1]) + (["preset"] if len(loc) == 1 else [])  # preset: popped earlier
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else (f" (known: {', '.join(known)})" if known else "")
        return f"phantom option '{key}' is not known{hint}{more}"
    msg = e["msg"].removeprefix("Value error, ")
    if "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
        return f"phantom option '{key}' = {e['input']!r}: {msg}{more}"
    return f"phantom option '{key}': {msg}{more}"


def resolve_options(options: dict[str, Any] | None) -> PhantomOptions:
    """Raw site options (optional `preset` plus PhantomOptions fields) -> PhantomOptions.

    Explicit fields are deep-merged over the preset's. Raises PhantomOptionError (one line).
    """
    raw = dict(options or {})
    preset = raw.pop("preset", None)
    base = load_preset(preset) if preset is not None else {}
    merged = deep_merge(base, raw)
    try:
        return PhantomOptions.model_validate(merged)
    except ValidationError as e:
        err = e
    # Blame the preset file only when it is the preset that does not validate on its own.
    if preset is not None:
        try:
            PhantomOptions.model_validate(base)
        except ValidationError as e:
            raise PhantomOptionError(f"{explain(e)} (in preset '{preset}')") from None
    raise PhantomOptionError(explain(err)) from None


def logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


__all__ = [
    "MODELLED", "DEVICES", "PRESETS", "PhantomOptionError", "AgeSpec", "SeveritySpec",
    "PopulationSpec", "MarkerSpec", "AcquisitionSpec", "LabellerSpec", "ShortcutSpec",
    "PhantomOptions", "deep_merge", "load_preset", "resolve_options", "explain",
]
