"""Measure how the trained read-out holds up on test faces framed unlike its training faces.

Examples:
  python utils/robustness.py --config configs/celebamask_hq64.yaml      # the bundled real-face read-out
  python utils/robustness.py --shift 0.2 --zoom-out 0.3 --out runs/robustness_strong

Segments the labeled test split (labels.test_dir) as it is, shifted right and down by --shift of the side,
zoomed out by --zoom-out about the centre, and mirrored (left/right parts swap names in the ground truth),
each made from the full-resolution files; the uncovered border is grey and not scored. Reports mIoU, the
mean per-image uncertainty (segment.py's uncertainty.csv score) and its Spearman rank correlation with
per-image mIoU. Writes --out/robustness.md (the table), robustness.json (per image too), robustness.png
(per framing: image | ground truth | prediction) and the resolved config.yaml.
"""
from pathlib import Path

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import labeled_split
from diffuseseg.io import exclusive_folder
from diffuseseg.robustness import VARIANTS, run_robustness, save_robustness
from diffuseseg.runtime import configure_threads, resolve_device
from diffuseseg.segmentation import configured_views, load_trained_stack


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--shift", type=float, default=0.1, help="shift, as a share of the side (default 0.1)")
    parser.add_argument("--zoom-out", type=float, default=0.2, help="zoom-out, as a share of the side (default 0.2)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default=None, help="output folder (default: segment.out_dir + '_robustness')")
    args = parser.parse_args()
    if not 0 <= args.shift < 1:
        parser.error(f"--shift {args.shift}: expected a share of the side in [0, 1)")
    if not 0 <= args.zoom_out < 1:
        parser.error(f"--zoom-out {args.zoom_out}: expected a share of the side in [0, 1)")
    cfg = config_from_args(args)
    configure_threads(cfg.run.threads)
    extractor, readout, classes = load_trained_stack(cfg, resolve_device(cfg.run.device))
    split = labeled_split(cfg, "test")
    out = Path(args.out or f"{cfg.segment.out_dir.rstrip('/')}_robustness")
    with exclusive_folder(out):
        result = run_robustness(extractor, readout, split, cfg.labels.ignore_index, variants=args.variants,
                                shift=args.shift, zoom_out=args.zoom_out, vote_mode=cfg.ensemble.vote,
                                views=configured_views(cfg, classes.names, "test"),
                                batch_size=cfg.features.batch_size, picture=out / "robustness.png")
        save_robustness(result, out)
        save_config(cfg, out / "config.yaml")
    print(result.markdown())
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
