#!/usr/bin/env python
"""Grad-CAM panels of a run's model on one site's test images (pytorch-grad-cam).

    python launch/explain.py --run RUN_FOLDER --site NAME [--n 8] [--model NAME] [--split test]

Loads the run's config.yaml and the model's checkpoint, loads the site's data the way the site
does (sites.data.load_site: the same cache and patient-wise split), picks the `n` images with
the highest predicted score, and writes one PNG per image into `<run>/explain/<site>/<model>/`:
the image, then one Grad-CAM heatmap per predicted finding (score at or above the model's
deployable threshold from results.json, else 0.5; the top finding if none is), with the score,
the threshold and the site's label. An index.md lists them.

Where this runs: the panels are the site's images. In a deployment this script runs AT THE
SITE, on the machine that holds the images (it needs the run's config.yaml and checkpoint, which
the site already has or can be given); the panels stay there and are never sent to the
coordinator. In simulation every site lives on this machine, so they land in the run folder.

FedBN models: a site's own BatchNorm lives only in that site's Flower node state, not in the
checkpoint; here BatchNorm statistics are re-estimated on the site's own training images (the
same 'adapted' mode the evaluator uses at a site that never trained the model), and index.md
says so.

Exit codes: 0 written, 2 bad arguments (unknown run, site or model), 1 failure.
"""
from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import time
from pathlib import Path

from chestfed.launch.cli import EXIT_FAILED, EXIT_USAGE, fail, setup_logging

from chestfed.common.errors import ChestFedError
from chestfed.common.atomic import write_bytes, write_text
from chestfed.common.config import load_config
from chestfed.server.run.folder import read_json_file
import numpy as np

log = logging.getLogger("chestfed.explain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="explain.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="run folder (config.yaml, checkpoints/)")
    p.add_argument("--site", required=True, help="the site whose images are explained")
    p.add_argument("--n", type=int, default=8, help="number of images (highest scores first)")
    p.add_argument("--model", help="model name (default: one trained at this site, else the first)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def target_layer(model, arch: str):
    """The layer Grad-CAM reads: the last convolutional stage of each architecture."""
    import torch  # lazy: torch loads only when this runs

    if arch.startswith("resnet"):
        return model.layer4[-1]
    if arch.startswith("densenet"):
        return model.features[-1]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ChestFedError(f"model '{arch}' has no convolutional layer for Grad-CAM")
    return convs[-1]


def pick_model(results: dict, site: str, wanted: str | None, run: Path) -> str:
    models = results.get("models") or {}
    if not models:  # no results.json yet: the checkpoints are all there is
        models = {p.stem: {"trained_on": []} for p in (run / "checkpoints").glob("*.pt")
                  if p.stem != "latest"}
    if wanted:
        if wanted not in models:
            raise ChestFedError(f"no model '{wanted}' in {run} (models: {', '.join(models) or 'none'})")
        return wanted
    if not models:
        raise ChestFedError(f"{run}: no checkpoints/ to explain (did the run finish?)")
    internal = [m for m, info in models.items() if site in (info.get("trained_on") or [])]
    return (internal or list(models))[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    run: Path = args.run
    if args.n < 1:
        fail("--n must be at least 1")
        return EXIT_USAGE
    if not (run / "config.yaml").is_file():
        fail(f"{run}: not a run folder (no config.yaml)")
        return EXIT_USAGE
    try:
        cfg = load_config(run / "config.yaml")
        site_cfg = cfg.site(args.site)

        results = read_json_file(run / "results.json") if (run / "results.json").is_file() else {}
        model_name = pick_model(results, args.site, args.model, run)
        ckpt = run / "checkpoints" / f"{model_name}.pt"
        if not ckpt.is_file():
            raise ChestFedError(f"checkpoint {ckpt} not found")
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_USAGE
    try:
        return explain(cfg, site_cfg, run, model_name, ckpt, results, args.n, args.split)
    except ChestFedError as exc:
        fail(str(exc))
        return EXIT_FAILED


def explain(cfg, site_cfg, run: Path, model_name: str, ckpt: Path, results: dict, n: int,
            split_name: str) -> int:
    import torch  # lazy: torch loads only when this runs
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib loads only when this runs
    from matplotlib.figure import Figure  # lazy: matplotlib loads only when this runs
    from pytorch_grad_cam import GradCAM  # lazy: pytorch_grad_cam loads only when this runs
    # lazy: pytorch_grad_cam loads only when this runs
    from pytorch_grad_cam.utils.image import show_cam_on_image
    # lazy: pytorch_grad_cam loads only when this runs
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from chestfed.common.batchnorm import reestimate  # lazy: brings in torch
    from chestfed.common.models import build_model  # lazy: brings in torch
    from chestfed.common.training import predict, to_input  # lazy: brings in torch
    from chestfed.sites.data import load_site  # lazy: brings in PIL, pandas, sklearn, torch

    t0 = time.perf_counter()
    torch.manual_seed(0)
    names = cfg.task.task().names
    data = load_site(cfg, site_cfg, progress=True)
    split = data.splits[split_name]
    if len(split) == 0:
        raise ChestFedError(f"site '{site_cfg.name}': the {split_name} split is empty")
    model = build_model(cfg.model.model_copy(update={"weights": None}), len(names))
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = blob.get("model", blob)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ChestFedError(f"{ckpt} does not fit {cfg.model.arch} with {len(names)} outputs")
    bn_note = "the checkpoint's BatchNorm"
    if missing:  # FedBN: BatchNorm stayed at the sites; re-estimate it on this site's images
        reestimate(model, data.splits["train"].images, torch.device("cpu"), cfg.model.in_channels,
                   cfg.train.batch_size)
        bn_note = ("BatchNorm re-estimated on this site's training images (FedBN: the site's own "
                   "BatchNorm is not in the checkpoint)")
    model.eval()
    device = torch.device("cpu")
    scores = predict(model, split.images, device, cfg.model.in_channels)
    thr_info = (results.get("thresholds") or {}).get(model_name) or {}
    thresholds = {}
    for label in names:
        t = (thr_info.get(label) or {}).get("threshold")
        thresholds[label] = float(t) if t is not None and math.isfinite(float(t)) else 0.5
    order = np.argsort(-np.nanmax(scores, axis=1), kind="stable")[:n]
    y = split.y.numpy()
    ids = split.meta["image_id"].astype(str).tolist() if "image_id" in split.meta else [str(i) for i in range(len(split))]
    out_dir = run / "explain" / site_cfg.name / model_name
    layer = target_layer(model, cfg.model.arch)
    rows = []
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for rank, i in enumerate(order, 1):
            s = scores[i]
            chosen = [j for j, label in enumerate(names) if s[j] >= thresholds[label]]
            below = not chosen
            if below:
                chosen = [int(np.argmax(s))]
            x = to_input(split.images[i:i + 1], cfg.model.in_channels)
            base = split.images[i].numpy().astype(np.float32) / 255.0
            rgb = np.repeat(base[:, :, None], 3, axis=2)
            fig = Figure(figsize=(2.8 * (1 + len(chosen)), 3.2))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot(1, 1 + len(chosen), 1)
            ax.imshow(base, cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{ids[i]}\n{site_cfg.name} ({split_name})", fontsize=8)
            ax.axis("off")
            for k, j in enumerate(chosen):
                heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(j)])[0]
                overlay = show_cam_on_image(rgb, heat, use_rgb=True)
                ax = fig.add_subplot(1, 1 + len(chosen), 2 + k)
                ax.imshow(overlay)
                truth = y[i, j]
                truth_s = "not labelled" if math.isnan(truth) else f"label {int(truth)}"
                ax.set_title(f"{names[j]}: p={s[j]:.2f} (t={thresholds[names[j]]:.2f})\n{truth_s}"
                             + (" [below t]" if below else ""), fontsize=8)
                ax.axis("off")
            fig.suptitle(f"Grad-CAM, {model_name}", fontsize=9)

            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
            fname = f"{rank:02d}_{''.join(c if c.isalnum() or c in '-_.' else '_' for c in ids[i])}.png"
            write_bytes(out_dir / fname, buf.getvalue())
            rows.append((fname, ids[i], ", ".join(f"{names[j]} {s[j]:.2f}" for j in chosen)))
    lines = [f"# Grad-CAM: {model_name} at {site_cfg.name} ({split_name} split)", "",
             f"- run: {run.name}; architecture {cfg.model.arch}; target layer: {type(layer).__name__} "
             "(last convolutional stage)",
             f"- BatchNorm: {bn_note}",
             "- images: the highest predicted scores; one heatmap per finding at or above the "
             "model's deployable threshold (0.5 where none was recorded)",
             "- these panels show the site's images: in a deployment they are made at the site "
             "and stay there", "",
             "| panel | image | findings (score) |", "|---|---|---|"]
    lines += [f"| [{f}]({f}) | {i} | {desc} |" for f, i, desc in rows]
    write_text(out_dir / "index.md", "\n".join(lines) + "\n")
    print(f"explain: {len(rows)} panel(s) in {out_dir} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
