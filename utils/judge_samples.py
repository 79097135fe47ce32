"""Judge generated faces with a face parser trained on real faces, and check that the judge agrees with the eye.

Examples:
  python utils/judge_samples.py --config configs/celebamask_hq64.yaml --samples runs/celebahq_64/samples
  python utils/judge_samples.py --config configs/celebamask_hq64.yaml --validate \
      --samples bundled=runs/samples/bundled v_pred=runs/study/v/snapshots/ema_fp16_min30.samples_256_ddim50.npy

The judge is sample.judge, a face parser trained once on real labeled faces (never the test faces):
  python utils/train_segmenter.py --config configs/celebamask_hq64.yaml \
      --train ../shared/data/celebamask_hq_ce/labeled ../shared/data/celebamask_hq_extra/labeled \
      --max-train 200 2911 --set segmenter.base_channels=16 --set segmenter.levels=4 \
      --set segmenter.steps=4000 --set segmenter.batch_size=16 --out runs/face_judge
Every set of images (a folder of images, or an .npy of uint8 (N, S, S, 3), as NAME=PATH or PATH) is compared
with the first --count test images (held out from the DDPM and the judge): the parser's Fréchet distance and
parts-in-place rate (docs/sample_quality.md), the random-feature distance and the two-sample accuracy.
--validate adds the judge's own check: --count training images (real faces the judge never saw: the floor), and
the same faces blurred, noised, JPEG-compressed and warped at three strengths each; damage_examples.png shows
one face under each. Writes --out/judged.md, judged.json and the resolved config.yaml.
"""
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import ImageFolder, unlabeled_images
from diffuseseg.errors import UserError
from diffuseseg.face_judge import FaceJudge, damaged_sets, judge_sets, judged_table
from diffuseseg.io import atomic_save_image, atomic_write_text, exclusive_folder
from diffuseseg.recipe_study import reference_images
from diffuseseg.runtime import configure_run
from diffuseseg.visualize import image_grid


def load_image_set(spec: str, size: int, count: int) -> tuple[str, np.ndarray]:
    """(name, first ``count`` images) of ``NAME=PATH`` or ``PATH`` (a folder of images or a .npy stack)."""
    name, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
    path = Path(path)
    if path.suffix == ".npy":
        images = np.load(path)[:count]
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise UserError(f"{path}: expected uint8 images of shape (N, {size}, {size}, 3), got {images.dtype} "
                            f"{images.shape}")
        return name, images
    if not path.is_dir():
        raise UserError(f"--samples {spec}: {path} is neither a folder of images nor an .npy file")
    folder = ImageFolder(path, size)
    return name, np.stack([folder[i] for i in range(min(count, len(folder)))])


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--samples", nargs="*", default=[], metavar="[NAME=]PATH", help="sets of images to judge")
    parser.add_argument("--validate", action="store_true", help="also judge real and damaged real faces")
    parser.add_argument("--no-critic", action="store_true",
                        help="leave out the two-sample accuracy (a CNN trained per set: minutes each on a CPU)")
    parser.add_argument("--count", type=int, default=256, help="images per set and held-out faces (default 256)")
    parser.add_argument("--out", default="runs/judge", help="output folder (default runs/judge)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    if not cfg.sample.judge:
        raise UserError("sample.judge is not set: train a face parser first (see --help) and --set sample.judge=PATH")
    if not (args.samples or args.validate):
        raise UserError("nothing to judge: give --samples and/or --validate")
    judge = FaceJudge(cfg.sample.judge)
    reference, described = reference_images(cfg, args.count)
    sets = dict(load_image_set(spec, cfg.model.im_size, args.count) for spec in args.samples)
    out = Path(args.out)
    with exclusive_folder(out):
        if args.validate:
            real = unlabeled_images(cfg, args.count)
            damaged = damaged_sets(real, seed=cfg.run.seed)
            sets = {"real training faces (the floor)": real, **damaged, **sets}
            atomic_save_image(image_grid(np.stack([real[0], *(d[0] for d in damaged.values())]),
                                         nrow=1 + len(damaged), scale=2), out / "damage_examples.png")
        rows = judge_sets(judge, reference, sets, seed=cfg.run.seed, critic=not args.no_critic)
        reference_parts = float(judge.parts_in_place(judge.features(reference)[1]).mean())
        table = judged_table(rows, reference_parts) + f"\n\nAgainst {described}; judge {cfg.sample.judge}.\n"
        atomic_write_text(out / "judged.md", table)
        atomic_write_text(out / "judged.json", json.dumps({"reference": described, "judge": cfg.sample.judge,
                                                           "reference_parts_in_place": reference_parts,
                                                           "sets": [asdict(r) for r in rows]}, indent=1))
        save_config(cfg, out / "config.yaml")
    print(table)
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
