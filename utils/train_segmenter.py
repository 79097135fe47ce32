"""Train an ordinary segmentation network on labeled folders and test it on real labeled images.

This is the downstream proof of the factory: train on synthetic pairs (and/or a few real ones),
evaluate on the real test split, compare with training on real pairs only.

Examples:
  python utils/train_segmenter.py --train runs/synthetic --out runs/segmenter/synthetic
  python utils/train_segmenter.py --train runs/synthetic/filtered --out runs/segmenter/filtered
  python utils/train_segmenter.py --train data/toy_faces/labeled --max-train 20 --out runs/segmenter/real20
  python utils/train_segmenter.py --train runs/synthetic data/toy_faces/labeled --max-train 200 20 \\
      --out runs/segmenter/synthetic+real20
  python utils/train_segmenter.py --train runs/synthetic --set segmenter.steps=3000 --set run.threads=2

Every --train folder is in the native labeled layout (images/, masks/ index PNGs, classes.json; a
folder without classes.json takes the config's labels.classes, so the preset reads the shared
CelebAMask-HQ faces as they are) and all must have the same class names. Images are resized to
model.im_size. Hyper-parameters are in the config's segmenter section; run.device and run.threads apply.
Writes OUT/segmenter.pt (format diffuseseg-segmenter/1), metrics.json (per-class IoU, mIoU, pixel
accuracy, per-image mIoU, confusion matrix), summary.json (data, timing, headline numbers) and the
resolved config.yaml; prints the per-class IoU table.
"""
import json
import time
from pathlib import Path

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import LabeledFolder, labeled_split
from diffuseseg.errors import DataError
from diffuseseg.errors import UserError
from diffuseseg.io import atomic_write_text, exclusive_folder
from diffuseseg.label_formats import resolve_classes
from diffuseseg.metrics import METRICS_FILE, evaluate
from diffuseseg.runtime import configure_run, resolve_device
from diffuseseg.segmenter import (count_parameters, load_training_folders, predict_masks, save_configured_segmenter,
                                  train_from_config)
from diffuseseg.views import mirror_pairs


def parse_args():
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--train", nargs="+", required=True, metavar="DIR",
                        help="one or more labeled folders to train on (e.g. a generated set and/or real labeled "
                             "images); their pairs are pooled")
    parser.add_argument("--test", metavar="DIR", default=None,
                        help="labeled folder to evaluate on (default: the config's test split, "
                             "labels.test_dir / labels.test_range)")
    parser.add_argument("--max-train", nargs="+", type=int, default=None, metavar="N",
                        help="use only the first N pairs (by name) of each --train folder: one N for all, "
                             "or one per folder in the same order (default: all)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output folder (default: segmenter.out_dir)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cfg = config_from_args(args)
    seg = getattr(cfg, "segmenter")
    configure_run(cfg.run)
    device = resolve_device(cfg.run.device)
    size = cfg.model.im_size
    if args.max_train is not None and any(n < 1 for n in args.max_train):
        raise UserError(f"--max-train must be positive, got {args.max_train}")
    if seg.arch == "unet" and size % 2 ** (seg.levels - 1):
        raise UserError(f"model.im_size={size} must be divisible by {2 ** (seg.levels - 1)} for a "
                        f"{seg.levels}-level U-Net (segmenter.levels)")

    # folders without classes.json (the shared CelebAMask-HQ faces) take the config's named class list
    lab = cfg.labels
    named = resolve_classes(lab.classes, lab.labeled_dir, lab.format) if lab.classes else None
    images, masks, classes, counts = load_training_folders(args.train, size, args.max_train, named)
    if args.test:
        test = LabeledFolder(args.test, size, default_classes=named)
    else:
        test = labeled_split(cfg, "test")
    if test.classes.names != classes.names:
        raise DataError(f"test folder {test.root} has a different class list than the training folder "
                        f"{args.train[0]}: {test.classes.names} != {classes.names}")
    test_names, test_images, test_masks = test.load()
    for folder, n in zip(args.train, counts):
        print(f"train: {n} pairs from {folder}")
    print(f"test:  {len(test_names)} pairs from {test.root}")

    if seg.hflip:
        flip_pairs = mirror_pairs(classes.names)
        if flip_pairs is None:
            print("note: a left/right class has no partner in the class list; horizontal flips are off")
        elif flip_pairs:
            print("flips swap " + ", ".join(f"{classes.names[a]}<->{classes.names[b]}" for a, b in flip_pairs))

    model = train_from_config(images, masks, classes.names, seg, ignore_index=cfg.labels.ignore_index,
                              device=device, progress=True, compile_backend=cfg.run.compile_backend)
    info = model.train_info

    t0 = time.perf_counter()
    preds = predict_masks(model, test_images, batch_size=seg.batch_size)
    predict_seconds = time.perf_counter() - t0
    report = evaluate(list(preds), list(test_masks), classes.names, cfg.labels.ignore_index)

    out = Path(args.out or seg.out_dir)
    summary = {
        "train": [{"folder": str(f), "pairs": n} for f, n in zip(args.train, counts)],
        "train_pairs": int(sum(counts)), "test": str(test.root), "test_pairs": len(test_names),
        "arch": seg.arch, "parameters": count_parameters(model), "device": str(device),
        "steps": info["steps"], "train_seconds": round(info["seconds"], 2),
        "train_images_per_second": round(info["images_per_second"], 1),
        "predict_seconds": round(predict_seconds, 2), "final_loss": info["smoothed_loss"],
        "miou": report.miou, "pixel_accuracy": report.pixel_accuracy,
    }
    with exclusive_folder(out):
        save_configured_segmenter(out / "segmenter.pt", model, seg, classes, summary)
        atomic_write_text(out / METRICS_FILE, report.to_json())
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        save_config(cfg, out / "config.yaml")

    print(report.table())
    print(f"mIoU {report.miou:.4f} on {len(test_names)} test images (pixel accuracy {report.pixel_accuracy:.4f}); "
          f"trained on {sum(counts)} pairs, {info['steps']} steps in {info['seconds']:.1f} s "
          f"({info['images_per_second']:.0f} img/s) -> {out}")


if __name__ == "__main__":
    run_main(main)
