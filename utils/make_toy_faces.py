"""Write the embedded toy-faces data set to disk in the labeled layout (images/, masks/, classes.json).

Examples:
  python utils/make_toy_faces.py                    # labeled, val and test splits under data.root
  python utils/make_toy_faces.py --splits test --set model.im_size=64

Each split is the index range given in the config (data.labeled_indices, ...), rendered at
model.im_size with data.toy_seed; faces are deterministic, so re-running rewrites identical files.
"""
from pathlib import Path

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import write_toy_split
from diffuseseg.io import exclusive_folder


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--splits", nargs="+", default=["labeled", "val", "test"],
                        choices=["labeled", "val", "test"], help="which splits to write (default: all three)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    for split in args.splits:
        with exclusive_folder(Path(cfg.data.root) / split) as root:
            write_toy_split(cfg, split, root)
            save_config(cfg, root / "config.yaml")
        start, stop = getattr(cfg.data, f"{split}_indices")
        print(f"{split}: {stop - start} faces at {cfg.model.im_size} px -> {root}")


if __name__ == "__main__":
    run_main(main)
