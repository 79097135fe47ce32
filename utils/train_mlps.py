"""Train the read-out on the labeled images' features: the pixel-MLP ensemble (from the feature store,
all members together, vectorised) or, with ensemble.readout=conv_head, convolutional heads.

Examples:
  python utils/train_mlps.py                                     # features.store_dir -> ensemble.path
  python utils/train_mlps.py --set ensemble.members=5 --set ensemble.class_balanced=true
  python utils/train_mlps.py --set ensemble.readout=conv_head    # heads on the feature maps

The pixel MLPs read the feature store of extract_features.py (labeled pixel rows). The conv heads need
whole feature maps, which the store does not keep: they extract the features of the first
labels.num_labeled labeled images here (in every view of ensemble.train_views), memory-mapped under
features.store_dir while used when they would take more than features.ram_limit_mb of RAM.

The output file holds the weights, class names, palette and the feature spec (timesteps, blocks,
noise, DDPM checkpoint hash) that segment.py checks before using it.
"""
from pathlib import Path

import numpy as np

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import labeled_split
from diffuseseg.label_formats import ClassList
from diffuseseg.feature_store import FeatureStore, spilled_view_features
from diffuseseg.features import FeatureSpec
from diffuseseg.io import exclusive_folder
from diffuseseg.pixel_classifier import save_ensemble
from diffuseseg.runtime import configure_run, resolve_device
from diffuseseg.segmentation import build_extractor, configured_views, describe_readout, fit, fit_readout, save_readout


def main() -> None:
    args = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2]).parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    device = resolve_device(cfg.run.device)
    path = Path(cfg.ensemble.path)
    with exclusive_folder(path.parent, f".{path.name}.lock"):
        trained_on = _train(cfg, path, device)
    print(f"{describe_readout(cfg)} on {trained_on} -> {path}")


def _train(cfg, path: Path, device) -> str:
    """Train the configured read-out and write it (with the resolved config) to ``path``; says on what."""
    if cfg.ensemble.readout == "pixel_mlp":
        store = FeatureStore.open(cfg.features.store_dir)
        classes = ClassList(store.meta["class_names"], np.asarray(store.meta["palette"], np.uint8))
        ensemble, meta = fit(cfg, store.features, store.labels, classes, FeatureSpec.from_dict(store.meta["spec"]),
                             device=device)
        meta["trained_on"], meta["train_views"] = store.meta["images"], store.meta.get("views", "none")
        save_ensemble(path, ensemble, meta)
        trained_on = f"{store.meta['rows']} pixels"
    else:
        split = labeled_split(cfg, "labeled")
        n = cfg.labels.num_labeled
        names, images, masks = split.load(range(n))
        extractor = build_extractor(cfg, "ddpm", device)
        views = configured_views(cfg, split.classes.names, "train")
        # 200 faces in 10 views at 1008 channels are 16 GB: past the RAM limit they go to disk
        features, scratch = spilled_view_features(
            extractor, images, views, np.arange(n), batch_size=cfg.features.batch_size,
            store_dir=cfg.features.store_dir, ram_limit_mb=cfg.features.ram_limit_mb, what="train-mlps",
            progress=True)
        try:
            heads, meta = fit_readout(cfg, features, masks, views, split.classes, extractor.spec, device)
        finally:
            features = None  # the memory maps close before their files go
            if scratch:
                scratch.cleanup()
        meta["trained_on"], meta["train_views"] = list(names), views.name
        save_readout(path, heads, meta)
        trained_on = f"{n} images x {len(views)} views"
    save_config(cfg, path.with_name("config.yaml"))
    return trained_on


if __name__ == "__main__":
    run_main(main)
