"""Segment images with the trained ensemble; evaluate against ground truth where it exists.

Examples:
  python utils/segment.py                                       # the labeled test split: masks + mIoU
  python utils/segment.py --set segment.input_dir=my_images     # any folder of images: masks only

Writes segment.out_dir/masks/<name>.png (index PNGs with the palette embedded), colour/ and
overlay/ PNGs, grid.png (image | ground truth | prediction, or image | prediction),
uncertainty.csv (per-image score, official top-10% rule) and, with ground truth, metrics.json and
the per-class IoU table.
"""
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import ImageFolder, labeled_split
from diffuseseg.label_formats import palette_image
from diffuseseg.io import atomic_save_image, atomic_write_text, exclusive_folder
from diffuseseg.metrics import METRICS_FILE, evaluate
from diffuseseg.runtime import configure_threads, resolve_device
from diffuseseg.segmentation import configured_views, load_trained_stack, segment
from diffuseseg.visualize import colorize, overlay, save_grid


def main() -> None:
    args = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2]).parse_args()
    cfg = config_from_args(args)
    configure_threads(cfg.run.threads)
    device = resolve_device(cfg.run.device)
    extractor, ensemble, classes = load_trained_stack(cfg, device)

    if cfg.segment.input_dir:
        folder = ImageFolder(cfg.segment.input_dir, cfg.model.im_size, cfg.data.on_bad_image)
        names = [p.relative_to(cfg.segment.input_dir).with_suffix("").as_posix().replace("/", "_")
                 for p in folder.files]
        images, gt = np.stack([folder[i] for i in range(len(folder))]), None
    else:
        names, images, gt = labeled_split(cfg, "test").load()

    result = segment(extractor, ensemble, images, vote_mode=cfg.ensemble.vote,
                     views=configured_views(cfg, classes.names, "test"),
                     batch_size=cfg.features.batch_size, progress=True)
    out = Path(cfg.segment.out_dir)
    with exclusive_folder(out):
        save_config(cfg, out / "config.yaml")
        for name, image, mask in zip(names, images, result.masks):
            atomic_save_image(palette_image(mask, classes.palette), out / "masks" / f"{name}.png")
            if cfg.segment.save_overlays:
                atomic_save_image(Image.fromarray(colorize(mask, classes.palette)), out / "colour" / f"{name}.png")
                atomic_save_image(Image.fromarray(overlay(image, mask, classes.palette)), out / "overlay" / f"{name}.png")
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["name", "uncertainty"])
        writer.writerows((n, f"{s:.6f}") for n, s in zip(names, result.image_scores))
        atomic_write_text(out / "uncertainty.csv", buffer.getvalue())

        shown = slice(0, min(16, len(names)))
        columns = [images[shown]] + ([colorize(gt[shown], classes.palette)] if gt is not None else [])
        columns.append(colorize(result.masks[shown], classes.palette))
        save_grid(np.stack(columns, axis=1).reshape(-1, *images.shape[1:]), out / "grid.png", nrow=len(columns) * 2,
                  scale=3)
        if gt is not None:
            report = evaluate(list(result.masks), list(gt), classes.names, cfg.labels.ignore_index)
            atomic_write_text(out / METRICS_FILE, report.to_json())
            print(report.table())
            print(f"mIoU {report.miou:.4f} over {len(names)} test images; pixel accuracy {report.pixel_accuracy:.4f}")
    print(f"wrote {len(names)} masks to {out / 'masks'}")


if __name__ == "__main__":
    run_main(main)
