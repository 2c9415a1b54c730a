"""The phantom hospitals: determinism, each shift knob doing what it says and nothing else,
the rendered anatomy matching the truth behind it, errors naming the bad key, and speed."""
from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from chestfed.common.errors import ChestFedError
from chestfed.common.labels import FINDINGS, INDEX, NO_FINDING
from chestfed.sites.adapters.base import ADAPTERS, META_COLUMNS, SiteDataError
from chestfed.sites.phantom import (
    MODELLED,
    AcquisitionSpec,
    MarkerSpec,
    PhantomAdapter,
    PhantomOptions,
    contact_sheet,
    draw_population,
    geometry,
    label,
    render,
)
from chestfed.sites.phantom.spec import PRESET_DIR, LabellerSpec

SMALL = {"population": {"size": 120}}


def site(preset: str = "a", name: str = "hospital", **over: object) -> PhantomAdapter:
    opts: dict[str, object] = {"preset": preset, **SMALL}
    for k, v in over.items():
        opts[k] = {**opts[k], **v} if isinstance(v, dict) and isinstance(opts.get(k), dict) else v
    return PhantomAdapter(name, None, opts)


def images(s: PhantomAdapter, idx, size: int = 64) -> np.ndarray:
    return np.stack([s.read_image(i, size) for i in idx])


def same_labels(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a, b, equal_nan=True)


# --- presets and records ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["a", "b", "c"])
def test_preset_files_are_exactly_phantom_options(preset: str) -> None:
    data = yaml.safe_load((PRESET_DIR / f"phantom_{preset}.yaml").read_text())
    opts = PhantomOptions.model_validate(data)
    assert 500 <= opts.population.size <= 700
    assert opts.population.n_patients() == round(opts.population.size / 1.5)


def test_registered_and_records_shape() -> None:
    assert ADAPTERS["phantom"] is PhantomAdapter
    s = PhantomAdapter("hospital_a", None, {"preset": "a"})
    rec = s.records()
    assert len(rec) == 600
    assert list(rec.meta.columns[: len(META_COLUMNS)]) == list(META_COLUMNS)
    assert rec.meta["official_split"].isna().all()
    assert set(rec.meta["sex"]) <= {"M", "F"} and set(rec.meta["view"]) <= {"PA", "AP"}
    assert rec.labels.shape == (600, len(FINDINGS)) and rec.labels.dtype == np.float32
    truth = rec.extras["truth"]
    assert len(truth) == 600 and "shortcut_device" in truth
    assert all(f"sev_{f}" in truth for f in MODELLED)
    # Several images per patient (patient-wise splits need them), sharing age and sex.
    per_patient = rec.meta.groupby("patient_id").size()
    assert 350 <= len(per_patient) <= 450 and per_patient.max() >= 3
    assert (rec.meta.groupby("patient_id")[["age", "sex"]].nunique() == 1).all().all()
    # Severity: 0 when absent, in (0, 1] when present.
    sev = truth[[f"sev_{f}" for f in MODELLED]].to_numpy()
    assert ((sev == 0) | ((sev > 0) & (sev <= 1))).all()
    # 'No Finding' is 1 exactly when no annotated finding is 1.
    cols = [INDEX[f] for f in MODELLED]
    any_pos = (rec.labels[:, cols] == 1).any(axis=1)
    assert np.array_equal(rec.labels[:, INDEX[NO_FINDING]] == 1, ~any_pos)


def test_prevalence_roughly_as_configured_and_age_raises_cardiomegaly() -> None:
    opts = PhantomOptions(population={"size": 4000, "age_effect": 1.0}, seed=3)
    pop = draw_population(opts)
    for f, p in opts.population.prevalence.items():
        assert abs((pop[f"sev_{f}"] > 0).mean() - p) < 0.035, f
    old = pop["age"] > pop["age"].median()
    cm = pop["sev_Cardiomegaly"] > 0
    assert cm[old].mean() > 1.5 * cm[~old].mean()


# --- determinism ------------------------------------------------------------------------------

def test_same_seed_gives_identical_images_and_labels_in_any_order() -> None:
    s1, s2 = site("c"), site("c")
    assert same_labels(s1.records().labels, s2.records().labels)
    forward = images(s1, range(12))
    backward = images(s2, range(11, -1, -1))[::-1]
    assert np.array_equal(forward, backward)
    # A worker process gets a pickled reader; it must render the same bytes.
    reader = pickle.loads(pickle.dumps(s1.worker_reader()))
    assert np.array_equal(reader(5, 64), forward[5])
    assert s1.fingerprint() == s2.fingerprint()


def test_different_seed_gives_different_images_and_labels() -> None:
    s1, s2 = site("a"), site("a", seed=12345)
    assert not same_labels(s1.records().labels, s2.records().labels)
    assert not np.array_equal(images(s1, range(4)), images(s2, range(4)))
    assert s1.fingerprint() != s2.fingerprint()


# --- the rendered anatomy matches the truth ---------------------------------------------------

def measure_ctr(img: np.ndarray, heart_row: float, lung: int = 90, heart: int = 150) -> tuple[float, int]:
    """Cardiothoracic ratio measured on pixels of a plain (pre-acquisition) render.

    Thorax: the widest span of dark lung (< `lung`) inside the chest wall, over all rows.
    Heart: the bright run around the midline between the lungs (< `heart` is lung), at the
    rows around the widest heart row (median of a few rows, robust to a rib or vessel).
    """
    size = img.shape[0]
    c = size // 2
    widths, thorax = {}, 0
    for r in range(size):
        row = img[r].astype(int)
        body = np.flatnonzero(row > 30)
        if len(body) < 4:
            continue
        seg = row[body[0]:body[-1] + 1]
        wall = np.flatnonzero(seg >= lung)  # skip the soft edge of the body outline
        if len(wall) < 2:
            continue
        dark = np.flatnonzero(seg[wall[0]:wall[-1] + 1] < lung) + body[0] + wall[0]
        if len(dark) < 2 or dark[0] >= c or dark[-1] <= c:
            continue  # not a row with both lungs
        t0, t1 = dark[0], dark[-1]
        thorax = max(thorax, t1 - t0 + 1)
        lungish = np.flatnonzero(img[r, t0:t1 + 1] < heart) + t0
        left, right = lungish[lungish < c], lungish[lungish > c]
        if len(left) and len(right):
            widths[r] = right[0] - left[-1] - 1
    band = max(1, size // 64)
    near = [w for r, w in widths.items() if abs(r - heart_row) <= band]
    return float(np.median(near)) / thorax, thorax


def test_rendered_ctr_exceeds_threshold_exactly_when_cardiomegaly_above_threshold() -> None:
    from chestfed.sites.phantom.render import ctr_for_severity

    threshold = 0.3
    opts = PhantomOptions(population={"size": 400, "prevalence": {"Cardiomegaly": 0.5}}, seed=9)
    pop = draw_population(opts)
    sev = pop["sev_Cardiomegaly"].to_numpy()
    # Severities within 0.12 of the threshold differ by < 0.02 in CTR: pixel rounding territory.
    keep = np.flatnonzero((sev == 0) | (np.abs(sev - threshold) > 0.12))[:70]
    ctr_cut = ctr_for_severity(threshold)
    plain = AcquisitionSpec.plain()
    agree, n_pos = 0, 0
    for i in keep:
        row = pop.iloc[i].to_dict()
        row.update({f"sev_{f}": 0.0 for f in MODELLED if f != "Cardiomegaly"}, view="PA")
        g = geometry(row, 256)
        img = render(row, plain, 256, np.random.default_rng(0))
        ctr, thorax = measure_ctr(img, g["heart_row"])
        assert abs(thorax - g["thorax_width"]) <= 2
        assert abs(ctr - g["ctr"]) < 0.015, (i, ctr, g["ctr"])
        truth = sev[i] > threshold
        agree += (ctr > ctr_cut) == truth
        n_pos += truth
        # Normal hearts are drawn with CTR < 0.5, enlarged ones above.
        assert (g["ctr_pa"] > 0.5) == (sev[i] > 0)
    assert agree == len(keep)
    assert 10 <= n_pos <= len(keep) - 10


def test_ap_view_magnifies_the_heart() -> None:
    pop = draw_population(PhantomOptions(population={"size": 20}, seed=4))
    row = pop.iloc[0].to_dict()
    row.update({f"sev_{f}": 0.0 for f in MODELLED})
    ctrs = {}
    for view in ("PA", "AP"):
        row["view"] = view
        g = geometry(row, 256)
        ctrs[view], _ = measure_ctr(render(row, AcquisitionSpec.plain(), 256, np.random.default_rng(0)), g["heart_row"])
    assert ctrs["AP"] > ctrs["PA"] * 1.04


def test_each_finding_changes_the_image_where_expected() -> None:
    pop = draw_population(PhantomOptions(population={"size": 20}, seed=2))
    base = pop.iloc[0].to_dict()
    base.update({f"sev_{f}": 0.0 for f in MODELLED}, view="PA")
    plain = AcquisitionSpec.plain()
    normal = render(base, plain, 128, np.random.default_rng(0)).astype(int)
    for f in MODELLED:
        img = render({**base, f"sev_{f}": 0.9}, plain, 128, np.random.default_rng(0)).astype(int)
        diff = img - normal
        assert np.abs(diff).max() > 30, f
        if f != "Pneumothorax":  # opacities brighten the lung; a pneumothorax mostly darkens it
            assert diff.sum() > 0, f
        else:
            assert (diff < -10).sum() > 50
    # Severity scales the finding: a mild effusion changes fewer pixels than a severe one.
    mild = render({**base, "sev_Effusion": 0.2}, plain, 128, np.random.default_rng(0)).astype(int)
    severe = render({**base, "sev_Effusion": 1.0}, plain, 128, np.random.default_rng(0)).astype(int)
    assert (np.abs(severe - normal) > 20).sum() > 1.5 * (np.abs(mild - normal) > 20).sum()


# --- each shift knob changes what it should and nothing else ----------------------------------

def test_labeller_changes_labels_but_never_pixels() -> None:
    s1 = site("a")
    s2 = site("a", labeller={"thresholds": {"Cardiomegaly": 0.7}, "noise": 0.2})
    assert not same_labels(s1.records().labels, s2.records().labels)
    assert np.array_equal(images(s1, range(6)), images(s2, range(6)))
    # A stricter threshold can only remove positives (before noise).
    pop = s1.population
    strict = label(pop, LabellerSpec(thresholds={"Cardiomegaly": 0.7}, noise=0.0), 0)
    loose = label(pop, LabellerSpec(noise=0.0), 0)
    c = INDEX["Cardiomegaly"]
    assert strict[:, c].sum() < loose[:, c].sum()
    assert not np.any((strict[:, c] == 1) & (loose[:, c] == 0))


def test_acquisition_changes_pixels_but_never_labels() -> None:
    s1 = site("a")
    s2 = site("a", acquisition={"gamma": 0.6, "noise": 0.08, "blur": 2.0, "rotation": 10.0})
    assert same_labels(s1.records().labels, s2.records().labels)
    pd.testing.assert_frame_equal(s1.records().extras["truth"], s2.records().extras["truth"])
    a, b = images(s1, range(6)), images(s2, range(6))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5
    assert s1.fingerprint() != s2.fingerprint()


def test_not_annotated_and_unmodelled_findings_are_nan() -> None:
    b, c = site("b"), site("c")
    lb, lc = b.records().labels, c.records().labels
    assert np.isnan(lb[:, INDEX["Nodule"]]).all() and not b.records().annotated[INDEX["Nodule"]]
    assert np.isnan(lc[:, INDEX["Edema"]]).all() and not c.records().annotated[INDEX["Edema"]]
    assert not np.isnan(lb[:, INDEX["Edema"]]).any()
    for f in FINDINGS:
        if f not in MODELLED and f != NO_FINDING:
            assert np.isnan(lb[:, INDEX[f]]).all(), f
            assert not b.records().annotated[INDEX[f]]
    assert not np.isnan(lb[:, INDEX[NO_FINDING]]).any()
    ann = b.records().annotated
    assert np.array_equal(~np.isnan(lb).all(axis=0), ann)


def test_prevalence_shift_moves_label_frequencies_only_for_that_finding() -> None:
    low = site("a", population={"size": 600, "prevalence": {"Effusion": 0.05}})
    high = site("a", population={"size": 600, "prevalence": {"Effusion": 0.40}})
    e = INDEX["Effusion"]
    assert np.nanmean(high.records().labels[:, e]) > np.nanmean(low.records().labels[:, e]) + 0.2
    # The other findings' truth is untouched (independent random streams per finding).
    others = [f"sev_{f}" for f in MODELLED if f != "Effusion"]
    pd.testing.assert_frame_equal(low.population[others], high.population[others])


def test_label_noise_flips_about_the_configured_fraction() -> None:
    pop = draw_population(PhantomOptions(population={"size": 3000}, seed=1))
    clean = label(pop, LabellerSpec(noise=0.0), 5)
    noisy = label(pop, LabellerSpec(noise=0.1), 5)
    cols = [INDEX[f] for f in MODELLED]
    assert abs((clean[:, cols] != noisy[:, cols]).mean() - 0.1) < 0.01


def test_shortcut_device_tracks_its_finding_and_is_drawn_only_when_present() -> None:
    s = site("c", population={"size": 600})
    pop = s.population
    pos = pop["sev_Pneumothorax"] > 0
    dev = pop["shortcut_device"]
    assert 0.65 < dev[pos].mean() <= 0.95 and dev[~pos].mean() < 0.08
    assert not site("a").population["shortcut_device"].any()
    # Device pixels: re-render the same rows with and without the device.
    plain = AcquisitionSpec.plain()
    rows = pop.iloc[:40].to_dict("records")
    for row in rows:
        with_dev = render(row, plain, 64, np.random.default_rng(0))
        without = render({**row, "device": "", "shortcut_device": False}, plain, 64, np.random.default_rng(0))
        changed = np.abs(with_dev.astype(int) - without.astype(int)).max() > 20
        assert changed == bool(row["shortcut_device"])
    assert dev.iloc[:40].any() and (~dev.iloc[:40]).any()  # both cases were exercised


@pytest.mark.parametrize("device", ["pacemaker", "marker"])
def test_other_shortcut_devices_draw_pixels(device: str) -> None:
    s = site("a", shortcut={"finding": "Cardiomegaly", "device": device, "p_if_positive": 1.0,
                            "p_if_negative": 0.0})
    pop = s.population
    i = int(np.flatnonzero(pop["shortcut_device"])[0])
    row = pop.iloc[i].to_dict()
    a = render(row, AcquisitionSpec.plain(), 64, np.random.default_rng(0)).astype(int)
    b = render({**row, "device": ""}, AcquisitionSpec.plain(), 64, np.random.default_rng(0)).astype(int)
    assert np.abs(a - b).max() > 40
    assert np.array_equal(pop["shortcut_device"], pop["sev_Cardiomegaly"] > 0)


@pytest.mark.parametrize("position", ["top_left", "top_right", "bottom_left", "bottom_right"])
@pytest.mark.parametrize("kind", ["text", "square", "circle"])
def test_marker_is_burned_into_the_configured_corner(kind: str, position: str) -> None:
    pop = draw_population(PhantomOptions(population={"size": 5}, seed=0))
    row = pop.iloc[0].to_dict()
    acq = AcquisitionSpec.plain()
    marked = acq.model_copy(update={"marker": MarkerSpec(kind=kind, text="PORTABLE", position=position, size=0.08)})
    a = render(row, acq, 128, np.random.default_rng(0)).astype(int)
    b = render(row, marked, 128, np.random.default_rng(0)).astype(int)
    ys, xs = np.nonzero(np.abs(a - b) > 10)
    assert len(ys) > 10
    top, left = position.startswith("top"), position.endswith("left")
    assert ((ys < 64) if top else (ys >= 64)).all()
    assert ((xs < 64) if left else (xs >= 64)).all()


# --- options and errors -----------------------------------------------------------------------

def test_explicit_fields_override_the_preset_by_deep_merge() -> None:
    s = PhantomAdapter("x", None, {"preset": "b", "population": {"prevalence": {"Edema": 0.0}},
                                   "acquisition": {"marker": {"position": "bottom_right"}}})
    o = s.spec
    assert o.population.prevalence["Edema"] == 0.0
    assert o.population.prevalence["Effusion"] == 0.35  # the rest of preset b's prevalences stay
    assert o.population.ap_fraction == 0.85
    assert o.acquisition.marker.kind == "text" and o.acquisition.marker.position == "bottom_right"
    # The fingerprint hashes the resolved options, not the preset's name.
    resolved = PhantomAdapter("y", None, PhantomAdapter("z", None, {"preset": "a"}).options)
    assert resolved.fingerprint() == PhantomAdapter("z", None, {"preset": "a"}).fingerprint()
    assert "preset" not in s.options and s.options["acquisition"]["contrast"] == 0.75


def test_defaults_alone_work() -> None:
    s = PhantomAdapter("default", None, {"population": {"size": 30}})
    assert s.records().labels.shape == (30, len(FINDINGS))
    assert s.read_image(3, 48).shape == (48, 48)


@pytest.mark.parametrize("options, needles", [
    ({"acquisition": {"nosie": 0.1}}, ["acquisition.nosie", "did you mean 'noise'"]),
    ({"preset": "a", "populaton": {}}, ["populaton", "did you mean 'population'"]),
    ({"population": {"prevalence": {"Cardiomegally": 0.2}}}, ["population.prevalence", "did you mean 'Cardiomegaly'"]),
    ({"population": {"prevalence": {"Fibrosis": 0.2}}}, ["population.prevalence", "Fibrosis"]),
    ({"labeller": {"not_annotated": ["Nodle"]}}, ["labeller.not_annotated", "did you mean 'Nodule'"]),
    ({"population": {"size": 0}}, ["population.size"]),
    ({"acquisition": {"marker": {"kind": "star"}}}, ["acquisition.marker.kind"]),
    ({"shortcut": {"finding": "Pneumothorax", "device": "tube"}}, ["shortcut.device"]),
    ({"preset": "d"}, ["preset 'd'"]),
])
def test_bad_option_raises_one_line_error_naming_the_key(options: dict, needles: list[str]) -> None:
    with pytest.raises(SiteDataError) as info:
        PhantomAdapter("hospital_a", None, options)
    msg = str(info.value)
    assert isinstance(info.value, ChestFedError)
    assert msg.startswith("site 'hospital_a': ") and "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_bad_preset_file_is_blamed_by_path(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("seed: 1\nlabeller: {noize: 0.1}\n")
    with pytest.raises(SiteDataError, match=r"labeller.noize.*did you mean 'noise'.*in preset"):
        PhantomAdapter("h", None, {"preset": str(f)})
    # A good preset file plus a bad override blames the override only.
    f.write_text("seed: 1\n")
    with pytest.raises(SiteDataError) as info:
        PhantomAdapter("h", None, {"preset": str(f), "seed": -1})
    assert "'seed'" in str(info.value) and "in preset" not in str(info.value)


def test_image_index_out_of_range_is_a_bad_image() -> None:
    from chestfed.sites.adapters.base import BadImageError

    with pytest.raises(BadImageError):
        site("a").read_image(10_000, 32)


# --- speed and the contact sheet --------------------------------------------------------------

def test_render_is_fast() -> None:
    s = site("b", population={"size": 200})
    s.read_image(0, 64)  # warm caches
    t = time.process_time()
    for i in range(200):
        s.read_image(i, 64)
    assert time.process_time() - t < 2.0


def test_contact_sheet_is_written(tmp_path: Path) -> None:
    out = contact_sheet(tmp_path / "sheet.png", size=64)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (4 * 64, 4 * 64)
