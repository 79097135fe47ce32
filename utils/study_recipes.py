"""Training-efficiency study: DDPM recipes trained from scratch for the same wall-clock budget, scored by
val mIoU of their features and by how far their samples are from real toy faces.

Examples:
  python utils/study_recipes.py                                     # every recipe, 10 min each (~17 min per recipe)
  python utils/study_recipes.py --recipes today min_snr --budget-min 5 --snapshot-min 2.5
  python utils/study_recipes.py --out runs/recipes --draws 3

Recipes are single changes to the config (listed by --help's choices; see diffuseseg/recipe_study.py).
Writes --out/<recipe>/ (the training run and its EMA snapshots), recipes.md (the table), recipes.json,
samples_last_snapshot.png (one row of samples per recipe) and
quality_vs_minutes.png (one line per recipe). Run it on an otherwise idle machine: the budget is
wall-clock time, so anything else running steals training steps from the recipe being trained.
Rerunning with the same --out resumes: finished trainings, val mIoUs and samples are kept.
"""
from diffuseseg.cli import config_parser, run_main
from diffuseseg.io import exclusive_folder
from diffuseseg.recipe_study import RECIPES, recipe_table, run_recipe_study
from diffuseseg.runtime import configure_threads, resolve_device
from diffuseseg.config import load_config


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--budget-min", type=float, default=10.0, help="training minutes per recipe")
    parser.add_argument("--snapshot-min", type=float, default=5.0, help="score the EMA weights every this many minutes")
    parser.add_argument("--labeled", type=int, default=20, help="labeled images for the val mIoU")
    parser.add_argument("--draws", type=int, default=2, help="label draws for the val mIoU")
    parser.add_argument("--samples", type=int, default=256, help="generated (and real) images for the sample figures")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of those samples")
    parser.add_argument("--out", default="runs/recipes", help="output folder")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)  # validates the base config before hours of training
    configure_threads(cfg.run.threads)
    with exclusive_folder(args.out):
        results = run_recipe_study(args.config, args.overrides, args.recipes, args.out,
                                         budget_min=args.budget_min, snapshot_min=args.snapshot_min,
                                         labeled=args.labeled, draws=args.draws, num_samples=args.samples,
                                         sample_steps=args.sample_steps, device=resolve_device(cfg.run.device))
    print(recipe_table(results, labeled=args.labeled, draws=args.draws, num_samples=args.samples,
                       sample_steps=args.sample_steps))
    print(f"-> {args.out}/recipes.md, quality_vs_minutes.png")


if __name__ == "__main__":
    run_main(main)
