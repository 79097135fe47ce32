"""Generate a synthetic labeled data set: DDPM samples segmented by the trained ensemble.

Examples:
  python utils/generate_dataset.py                                  # 200 pairs -> runs/synthetic
  python utils/generate_dataset.py --set generate.num_images=1000 --set generate.steps=25

Writes generate.out_dir/images/<id>.png, masks/<id>.png (index PNGs, palette embedded),
previews/<id>.png, manifest.jsonl (id, seed, uncertainty, per-class pixel fractions), classes.json,
config.yaml and filtered/ (the same pairs minus the most uncertain generate.filter_fraction).
Interrupted runs resume where they stopped: re-run the same command.

Several processes (GPUs, or CPU processes with gloo) share the work through torchrun; the result is the
same, byte for byte, as one process's:
  torchrun --nproc_per_node=4 utils/generate_dataset.py --set generate.num_images=20000
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 utils/generate_dataset.py
"""
from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.factory import generate_pairs
from diffuseseg.runtime import configure_run, device_for, init_distributed
from diffuseseg.segmentation import load_trained_stack


def main() -> None:
    args = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2]).parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    dist_info = init_distributed()
    device = device_for(dist_info, cfg.run.device)
    extractor, ensemble, classes = load_trained_stack(cfg, device)
    result = generate_pairs(cfg, extractor.model, extractor, ensemble, classes, device=device, dist_info=dist_info)
    if not dist_info.is_main:
        return
    print(f"{result.total} pairs in {result.out_dir} ({result.generated} new); "
          f"sampling {result.sampling_seconds:.1f} s, segmentation {result.segmentation_seconds:.1f} s, "
          f"{result.pairs_per_second:.2f} pairs/s")


if __name__ == "__main__":
    run_main(main)
