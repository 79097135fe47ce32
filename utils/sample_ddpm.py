"""Sample images from a trained DDPM (EMA weights by default) with DDPM or DDIM.

Examples:
  python utils/sample_ddpm.py                                   # 64 images from the bundled toy model
  python utils/sample_ddpm.py --set sample.sampler=ddpm --set sample.num_images=16
  python utils/sample_ddpm.py --set run.checkpoint=runs/ddpm/last.pt --set sample.steps=50
  python utils/sample_ddpm.py --set sample.trajectory=true --set sample.num_images=16   # + trajectory.gif
  python utils/sample_ddpm.py --config configs/celebamask_hq64.yaml --quality   # + quality.json, nearest_train.png

Writes sample.out_dir/<id>.png (numbered from 0), grid.png, trajectory.gif (with sample.trajectory)
and the resolved config.yaml. With --quality also quality.json (feature distance to the held-out test
images, with its real-against-real floor; the memorisation check: each sample's nearest training image and
the ratio of sample-to-train to held-out-to-train nearest distances) and nearest_train.png.
The same sample.seed gives the same images, whatever the batch size.
"""
from pathlib import Path

from diffuseseg.checkpoint import load_unet
from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import labeled_split, unlabeled_images
from diffuseseg.io import atomic_save_image, exclusive_folder
from diffuseseg.runtime import configure_run, resolve_device
from diffuseseg.sample_quality import sample_report
from diffuseseg.sampling import generate_images
from diffuseseg.visualize import save_animation, save_grid
from PIL import Image

QUALITY_TRAIN_IMAGES = 20000  # the training images searched for each sample's nearest one (all of a folder's)


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--quality", action="store_true",
                        help="also score the samples against the test split's images and check for memorisation")
    args = parser.parse_args()
    cfg = config_from_args(args)
    s = cfg.sample
    configure_run(cfg.run)
    device = resolve_device(cfg.run.device)
    model = load_unet(cfg.run.checkpoint, cfg, use_ema=cfg.run.use_ema, device=device)
    out = Path(s.out_dir)
    with exclusive_folder(out):  # taken before sampling: a bad output path fails before the work, not after
        frames = [] if s.trajectory else None
        images = generate_images(model, cfg, s.num_images, sampler=s.sampler, steps=s.steps, seed=s.seed,
                                 batch_size=s.batch_size, eta=s.eta, timestep_spacing=s.timestep_spacing,
                                 device=device, trajectory=frames)
        save_config(cfg, out / "config.yaml")
        width = len(str(s.num_images - 1))
        for i, image in enumerate(images):
            atomic_save_image(Image.fromarray(image), out / f"{i:0{width}d}.png")
        save_grid(images, out / "grid.png", scale=2)
        if frames:
            save_animation(frames, out / "trajectory.gif", scale=1)  # noise compresses badly: keep it small
        if args.quality:
            report = sample_report(images, unlabeled_images(cfg, QUALITY_TRAIN_IMAGES),
                                   labeled_split(cfg, "test").load()[1], out)
            print(f"memorisation ratio {report['ratio']:.3f} (sample-to-train / held-out-to-train nearest "
                  f"distance; well below 1 = copies); feature distance to held-out "
                  f"{report['feature_distance_samples_to_held_out']:.3f} (real training images: "
                  f"{report['feature_distance_train_to_held_out']:.3f})")
    print(f"wrote {len(images)} images, grid.png{' and trajectory.gif' if frames else ''} to {out}")


if __name__ == "__main__":
    run_main(main)
