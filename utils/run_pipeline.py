"""The main job: everything on the embedded default, one command, one report.

toy faces -> DDPM (run.checkpoint: the reference weights tracked in git; trained here for 5 min only
where that file is missing, or for --from-scratch minutes) -> sample
grid -> features + the read-out (ensemble.readout) on the first labels.num_labeled labeled images -> test
mIoU against baselines on the same images (raw RGB+xy with the same read-out; plain supervision: the
segmenter trained on them) -> a synthetic data set (generate.num_images pairs) -> downstream check (a
segmentation network trained on the real labels vs on the factory pairs, tested on real images).

Examples:
  python utils/run_pipeline.py                          # under 10 min on 2 CPU cores with the bundled weights
  python utils/run_pipeline.py --from-scratch 30        # train the DDPM here for 30 minutes first
  python utils/run_pipeline.py --labeled 5 10 20 --draws 3 --out runs/full

Every stage also runs alone with its own script (see README.md).
"""
from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.pipeline import run_pipeline


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--out", default="runs/pipeline", help="run folder (default: %(default)s)")
    parser.add_argument("--from-scratch", type=float, default=0.0, metavar="MINUTES",
                        help="train the DDPM here for this many minutes instead of using run.checkpoint")
    parser.add_argument("--labeled", type=int, nargs="+", default=None,
                        help="labeled-set sizes for the baselines (default: labels.num_labeled)")
    parser.add_argument("--draws", type=int, default=1, help="random label draws per size for the baselines")
    parser.add_argument("--no-downstream", action="store_true", help="skip the downstream segmenter check")
    args = parser.parse_args()
    cfg = config_from_args(args)
    run_pipeline(cfg, args.out, from_scratch_minutes=args.from_scratch,
                 labeled_sizes=tuple(args.labeled or [cfg.labels.num_labeled]), draws=args.draws,
                 downstream=not args.no_downstream)


if __name__ == "__main__":
    run_main(main)
