"""Phantom hospitals: synthetic chest radiograph sites with known ground truth.

A phantom site draws patients from a population (prior shift), renders an anatomical phantom
with findings where they belong, applies the site's acquisition style (covariate shift) and its
labeller (concept shift), and may draw a device that correlates with one finding at that site
only (a shortcut). See README.md in this folder for the knobs and the three presets.

Importing this package registers the `phantom` site adapter.
"""
from chestfed.sites.phantom.adapter import PhantomAdapter, contact_sheet, image_rng
from chestfed.sites.phantom.anatomy import geometry
from chestfed.sites.phantom.labeller import annotated_mask, label
from chestfed.sites.phantom.population import draw_population
from chestfed.sites.phantom.render import RENDER_VERSION, render
from chestfed.sites.phantom.spec import (
    MODELLED,
    AcquisitionSpec,
    LabellerSpec,
    MarkerSpec,
    PhantomOptionError,
    PhantomOptions,
    PopulationSpec,
    ShortcutSpec,
    resolve_options,
)

__all__ = [
    "MODELLED", "RENDER_VERSION", "AcquisitionSpec", "LabellerSpec", "MarkerSpec",
    "PhantomAdapter", "PhantomOptionError", "PhantomOptions", "PopulationSpec", "ShortcutSpec",
    "annotated_mask", "contact_sheet", "draw_population", "geometry", "image_rng", "label",
    "render", "resolve_options",
]
