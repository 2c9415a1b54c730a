"""Who comes to a phantom hospital: patients, their images, and the true findings in each.

One row per image. Images of one patient share age, sex, anatomy (`anatomy_seed`, which the
renderer uses for body shape and where each lesion sits) and, mostly, findings: each finding of
a follow-up image carries over from the patient's first image with probability `persistence`
(severity jittered a little), otherwise it is drawn afresh from the same prevalence, so the
marginal prevalence per image stays what the options say.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from chestfed.sites.phantom.spec import MODELLED, PhantomOptions, logit

log = logging.getLogger(__name__)

# Independent random streams, keyed by (seed, stream[, image]): the population, the labeller
# and the renderer never share draws, so changing one knob cannot move another's dice.
POPULATION_STREAM = 0x504F50  # "POP"
LABEL_STREAM = 0x4C4142  # "LAB"
RENDER_STREAM = 0x524E44  # "RND"
VIEW_STREAM = 0x564557  # "VEW": only drawn from when population.view_effect > 0

# How strongly age raises each finding's odds, as a multiple of `age_effect` (log-odds per SD).
AGE_WEIGHT: dict[str, float] = {"Cardiomegaly": 1.0, "Effusion": 0.5, "Edema": 0.5, "Mass": 0.5}

SEVERITY_FLOOR = 0.02  # a present finding is never invisible
SEVERITY_JITTER = 0.08  # sd of a persisting finding's severity change between images


def sev_column(finding: str) -> str:
    return f"sev_{finding}"


def truth_columns() -> list[str]:
    return [sev_column(f) for f in MODELLED] + ["shortcut_device"]


def _calibrated(p: float, shift: np.ndarray) -> np.ndarray:
    """Per-patient probabilities sigmoid(b + shift) whose mean is exactly p (Newton on b), so
    the age effect tilts who has the finding without changing the site's prevalence."""
    b = logit(p)
    for _ in range(30):
        q = 1.0 / (1.0 + np.exp(-(b + shift)))
        grad = float(np.mean(q * (1 - q)))
        step = (float(np.mean(q)) - p) / max(grad, 1e-12)
        b -= step
        if abs(step) < 1e-10:
            break
    return 1.0 / (1.0 + np.exp(-(b + shift)))


def draw_population(opts: PhantomOptions, seed: int | None = None) -> pd.DataFrame:
    """One row per image: ids, age, sex, view, true severities, shortcut device, anatomy seed.

    Columns: image_id, patient_id, age, sex ('M'/'F'), view ('PA'/'AP'), sev_<Finding> for each
    modelled finding (0 = absent, else in (0, 1]), shortcut_device (bool), device (the device's
    kind or ''), anatomy_seed (int, shared by a patient's images). Deterministic given the seed
    (default: opts.seed). The number of draws never depends on option values, so changing one
    prevalence changes only that finding's column.
    """
    seed = opts.seed if seed is None else int(seed)
    rng = np.random.default_rng([seed, POPULATION_STREAM])
    pop = opts.population
    n = pop.size
    n_pat = pop.n_patients()

    # Images per patient: one each, the rest spread with heavy-tailed weights (a few patients
    # have many follow-ups, as on a ward).
    weights = rng.gamma(0.7, size=n_pat) + 1e-9
    counts = 1 + rng.multinomial(n - n_pat, weights / weights.sum())
    patient_of = np.repeat(np.arange(n_pat), counts)
    first = np.r_[True, patient_of[1:] != patient_of[:-1]]

    age_p = np.clip(rng.normal(pop.age.mean, pop.age.sd, n_pat), 18.0, 95.0).round(0)
    female_p = rng.random(n_pat) < pop.female
    anatomy_seed_p = rng.integers(0, 2**31 - 1, n_pat)
    view_ap = rng.random(n) < pop.ap_fraction
    z_age = (age_p - pop.age.mean) / max(pop.age.sd, 1e-6)

    df = pd.DataFrame({
        "image_id": [f"img{i:05d}" for i in range(n)],
        "patient_id": [f"pat{j:05d}" for j in patient_of],
        "age": age_p[patient_of].astype(float),
        "sex": np.where(female_p, "F", "M")[patient_of],
        "view": np.where(view_ap, "AP", "PA"),
    })

    # view_effect: the sick are imaged AP (portable, supine) more often, so view predicts the
    # findings beyond what the image shows. Presence is then drawn per image from its own stream
    # (the default stream's draws, and so every site without the effect, stay as they were).
    view_rng = np.random.default_rng([seed, VIEW_STREAM]) if pop.view_effect > 0 else None
    a, b = pop.severity.alpha, pop.severity.beta
    for finding in MODELLED:
        # Same number of draws for every finding whatever its prevalence (stream stability).
        u_pat, sev_pat = rng.random(n_pat), rng.beta(a, b, n_pat)
        keep, u_img, sev_img = rng.random(n), rng.random(n), rng.beta(a, b, n)
        jitter = rng.normal(0.0, SEVERITY_JITTER, n)

        p = pop.prevalence[finding]
        if p <= 0.0 or p >= 1.0:
            p_pat = np.full(n_pat, float(p))
        else:
            shift = pop.age_effect * AGE_WEIGHT.get(finding, 0.0) * z_age
            p_pat = _calibrated(p, shift)
        present_pat = u_pat < p_pat
        carry = first | (keep < pop.persistence)
        present = np.where(carry, present_pat[patient_of], u_img < p_pat[patient_of])
        sev = np.where(carry, np.clip(sev_pat[patient_of] + np.where(first, 0.0, jitter), 0, 1), sev_img)
        if view_rng is not None:
            u_view = view_rng.random(n)
            if 0.0 < p < 1.0:  # prevalence kept (calibrated); age effect kept; persistence not
                tilt = pop.view_effect * view_ap + pop.age_effect * AGE_WEIGHT.get(finding, 0.0) * z_age[patient_of]
                present = u_view < _calibrated(p, tilt)
        df[sev_column(finding)] = np.where(present, np.clip(sev, SEVERITY_FLOOR, 1.0), 0.0)

    u_dev = rng.random(n)
    sc = opts.shortcut
    if sc is not None:
        pos = df[sev_column(sc.finding)].to_numpy() > 0
        device = u_dev < np.where(pos, sc.p_if_positive, sc.p_if_negative)
        kind = sc.device
    else:
        device, kind = np.zeros(n, dtype=bool), ""
    df["shortcut_device"] = device
    df["device"] = np.where(device, kind, "")
    df["anatomy_seed"] = anatomy_seed_p[patient_of].astype(np.int64)
    log.debug("phantom population: %d images of %d patients (seed %d)", n, n_pat, seed)
    return df
