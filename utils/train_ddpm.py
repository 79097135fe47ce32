"""Train an unconditional DDPM (U-Net, ε-prediction) on the configured images.

Examples:
  python utils/train_ddpm.py                                   # embedded toy faces, config.yaml
  python utils/train_ddpm.py --set train.time_budget_min=10    # stop after 10 minutes
  python utils/train_ddpm.py --resume                          # continue train.out_dir/last.pt
  python utils/train_ddpm.py --set data.source=folder --set data.root=/path/to/faces --set model.im_size=64
  torchrun --nproc_per_node=4 utils/train_ddpm.py              # multi-GPU (DDP)

The run folder (train.out_dir) receives last.pt (full state, atomic), ema_fp16.pt (EMA weights for
sampling and segmentation), train_log.jsonl, samples/step_*.png and the resolved config.yaml.
Ctrl-C stops after the current step and saves a checkpoint.
"""
from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.training import train_ddpm


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--resume", action="store_true", help="continue from train.out_dir/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    result = train_ddpm(config_from_args(args), resume=args.resume, progress=not args.no_progress)
    print(f"stopped by {result.stopped_by} at step {result.step}; run folder: {result.out_dir}")


if __name__ == "__main__":
    run_main(main)
