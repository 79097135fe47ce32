"""Extract DDPM pixel features of the labeled training images into an fp16 feature store.

Examples:
  python utils/extract_features.py                                  # first labels.num_labeled toy faces
  python utils/extract_features.py --set labels.num_labeled=50 --set features.timesteps=[50,150,250,400]
  python utils/extract_features.py --list-blocks                   # the U-Net's block names and shapes

Reads the DDPM at run.checkpoint; writes features.store_dir/{features.npy, labels.npy, meta.json}
and the resolved config.yaml. Each image is stored in every view of ensemble.train_views (e.g. also
mirrored). Peak memory is one batch, whatever the number of images. Under torchrun the images are
split across ranks (the store is byte-identical to one process's):
  torchrun --nproc_per_node=4 utils/extract_features.py --set labels.num_labeled=100
"""
from pathlib import Path

from diffuseseg.backbones import describe_blocks
from diffuseseg.checkpoint import load_unet
from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import labeled_split
from diffuseseg.feature_store import write_feature_store
from diffuseseg.runtime import configure_run, device_for, init_distributed, resolve_device
from diffuseseg.segmentation import build_extractor, configured_views


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--list-blocks", action="store_true",
                        help="print the configured U-Net's block names (for features.blocks) with their output "
                             "shapes, and exit")
    args = parser.parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    if args.list_blocks:
        model = load_unet(cfg.run.checkpoint, cfg, device=resolve_device(cfg.run.device))
        for name, (c, h, w) in describe_blocks(model):
            print(f"{name:24s} {c:5d} channels  {h}x{w}")
        return
    dist_info = init_distributed()
    split = labeled_split(cfg, "labeled")
    extractor = build_extractor(cfg, "ddpm", device_for(dist_info, cfg.run.device))
    folder = write_feature_store(cfg.features.store_dir, extractor, split, list(range(cfg.labels.num_labeled)),
                                 batch_size=cfg.features.batch_size, min_pixels=cfg.labels.min_pixels,
                                 ignore_index=cfg.labels.ignore_index,
                                 views=configured_views(cfg, split.classes.names, "train"), dist_info=dist_info)
    if not dist_info.is_main:
        return
    save_config(cfg, Path(folder) / "config.yaml")
    print(f"{cfg.labels.num_labeled} images, {extractor.dim} features per pixel -> {folder}")


if __name__ == "__main__":
    run_main(main)
