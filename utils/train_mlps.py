"""Train the pixel-MLP ensemble on a feature store (all members together, vectorised).

Examples:
  python utils/train_mlps.py                                     # features.store_dir -> ensemble.path
  python utils/train_mlps.py --set ensemble.members=5 --set ensemble.class_balanced=true

The ensemble file holds the weights, class names, palette and the feature spec (timesteps, blocks,
noise, DDPM checkpoint hash) that segment.py checks before using it.
"""
from pathlib import Path

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import ClassList
from diffuseseg.feature_store import FeatureStore
from diffuseseg.features import FeatureSpec
from diffuseseg.pixel_classifier import save_ensemble
from diffuseseg.runtime import configure_threads, resolve_device
from diffuseseg.segmentation import fit

import numpy as np


def main() -> None:
    args = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2]).parse_args()
    cfg = config_from_args(args)
    configure_threads(cfg.run.threads)
    store = FeatureStore.open(cfg.features.store_dir)
    classes = ClassList(store.meta["class_names"], np.asarray(store.meta["palette"], np.uint8))
    ensemble, meta = fit(cfg, store.features, store.labels, classes, FeatureSpec.from_dict(store.meta["spec"]),
                         device=resolve_device(cfg.run.device))
    meta["trained_on"], meta["train_views"] = store.meta["images"], store.meta.get("views", "none")
    path = Path(cfg.ensemble.path)
    save_ensemble(path, ensemble, meta)
    save_config(cfg, path.with_name("config.yaml"))
    print(f"ensemble of {cfg.ensemble.members} MLPs on {store.meta['rows']} pixels -> {path}")


if __name__ == "__main__":
    run_main(main)
