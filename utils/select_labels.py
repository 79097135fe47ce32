"""Choose which k images of an unlabeled folder to annotate: a diverse set in the DDPM's feature space.

Examples:
  python utils/select_labels.py --images data/toy_faces/labeled/images --k 20
  python utils/select_labels.py --images my_faces/ --k 10 --out runs/to_label --set model.im_size=64

Greedy k-center on pooled DDPM features (utils/diffuseseg/selection.py): each pick is the image least
like any picked so far, so rare looks get labels early. Writes --out/selection.txt (file names, one per
line, in the order chosen), selection.json, contact_sheet.png (the chosen images) and config.yaml.
Measure the gain over random draws with: python utils/evaluate_baselines.py --select kcenter
"""
import json
from pathlib import Path

import numpy as np

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import ImageFolder
from diffuseseg.errors import UserError
from diffuseseg.io import atomic_write_text, exclusive_folder
from diffuseseg.runtime import configure_run, resolve_device
from diffuseseg.segmentation import build_extractor
from diffuseseg.selection import image_descriptors, kcenter_greedy
from diffuseseg.visualize import save_grid


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--images", required=True, help="folder of unlabeled images (searched recursively)")
    parser.add_argument("--k", type=int, required=True, help="how many images to choose")
    parser.add_argument("--out", default="runs/select_labels", help="output folder (default: %(default)s)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    folder = ImageFolder(args.images, cfg.model.im_size, cfg.data.on_bad_image)
    if not 1 <= args.k <= len(folder):
        raise UserError(f"--k {args.k}: choose between 1 and {len(folder)} (the images in {args.images})")
    images = np.stack([folder[i] for i in range(len(folder))])
    extractor = build_extractor(cfg, "ddpm", resolve_device(cfg.run.device))
    order = kcenter_greedy(image_descriptors(extractor, images, batch_size=cfg.features.batch_size,
                                             seed=cfg.run.seed), args.k)
    names = [folder.files[i].relative_to(args.images).as_posix() for i in order]
    out = Path(args.out)
    with exclusive_folder(out):
        atomic_write_text(out / "selection.txt", "\n".join(names) + "\n")
        atomic_write_text(out / "selection.json", json.dumps(
            {"method": "kcenter", "k": args.k, "pool": len(folder), "images": names, "positions": order}, indent=1))
        save_grid(images[order], out / "contact_sheet.png", scale=3)
        save_config(cfg, out / "config.yaml")
    print(f"chose {args.k} of {len(folder)} images -> {out / 'selection.txt'}, contact_sheet.png")


if __name__ == "__main__":
    run_main(main)
