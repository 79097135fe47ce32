"""Quality against training time of one DDPM run: each EMA snapshot's val mIoU and sample distance.

Examples:
  python utils/score_snapshots.py --config configs/celebamask_hq64.yaml       # train.out_dir's snapshots
  python utils/score_snapshots.py --run runs/ddpm --labeled 10 --draws 2 --samples 256

A run keeps its EMA weights every train.snapshot_every_min training minutes (snapshots/ema_fp16_min<M>.pt).
Each is scored as the recipe study scores its snapshots: the configured read-out's val mIoU with --labeled
labels (--draws label draws, the code of evaluate_baselines.py), and --samples DDIM samples against as many
held-out real images (the first of the test split, images only; fresh toy faces for the toy data): the Fréchet distance in a random CNN's
features (lower is better) and a classifier two-sample test (0.5 = indistinguishable). Scores and samples
are kept beside each snapshot, so a rerun scores only the new ones. Writes --out/curve.md, curve.json,
quality_vs_minutes.png and the resolved config.yaml.
"""
import json
from dataclasses import asdict
from pathlib import Path

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.errors import UserError
from diffuseseg.io import atomic_save_image, atomic_write_text, exclusive_folder
from diffuseseg.recipe_study import quality_chart, reference_images, score_snapshots, snapshot_table
from diffuseseg.runtime import configure_run, resolve_device


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--run", default=None, help="the training run folder (default: train.out_dir)")
    parser.add_argument("--labeled", type=int, default=20, help="labeled images for the val mIoU (default 20)")
    parser.add_argument("--draws", type=int, default=1, help="label draws for the val mIoU (default 1)")
    parser.add_argument("--samples", type=int, default=128, help="samples and held-out images compared (default 128)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the samples (default 50)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/quality_vs_minutes)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    run = Path(args.run or cfg.train.out_dir)
    if not (run / "snapshots").is_dir():
        raise UserError(f"{run}/snapshots not found: train with train.snapshot_every_min > 0 to keep snapshots")
    real, real_description = reference_images(cfg, args.samples)
    out = Path(args.out or run / "quality_vs_minutes")
    with exclusive_folder(out):
        scores = score_snapshots(cfg, run, real, labeled=args.labeled, draws=args.draws,
                                 sample_steps=args.sample_steps, device=resolve_device(cfg.run.device))
        table = snapshot_table(scores, labeled=args.labeled, draws=args.draws) + (
            f"\n\n{args.samples} DDIM-{args.sample_steps} samples against {real_description}.\n")
        atomic_write_text(out / "curve.md", table)
        atomic_write_text(out / "curve.json", json.dumps({"run": str(run), "labeled": args.labeled,
                                                          "draws": args.draws, "samples": args.samples,
                                                          "snapshots": [asdict(s) for s in scores]}, indent=1))
        if scores:
            atomic_save_image(quality_chart({run.name: scores}, args.labeled), out / "quality_vs_minutes.png")
        save_config(cfg, out / "config.yaml")
    print(table)
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
