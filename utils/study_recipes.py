"""Training-efficiency study: DDPM recipes trained from scratch for the same wall-clock budget, scored by
val mIoU of their features and by how far their samples are from real images.

Examples:
  python utils/study_recipes.py                                     # every toy recipe, 10 min each (~17 min per recipe)
  python utils/study_recipes.py --recipes today min_snr --budget-min 5 --snapshot-min 2.5
  python utils/study_recipes.py --out runs/recipes --draws 3
  python utils/study_recipes.py --config configs/celebamask_hq64.yaml --study celebahq64 --budget-min 20 \
      --snapshot-min 20 --draws 1 --samples 64 --out runs/study64     # U-Net widths and data at 64 px
  python utils/study_recipes.py --config configs/celebamask_hq64.yaml --study celebahq64_4k --budget-steps 1200 \
      --draws 1 --samples 256 --set run.threads=1 --set sample.judge=checkpoints/face_judge_64/segmenter.pt \
      --out runs/study64_4k                                          # continue the reference: recipes (issue 42)

Recipes are changes to the config, grouped in studies (diffuseseg/recipe_study.py, STUDIES):
{studies}
Writes --out/<recipe>/ (the training run and its EMA snapshots), recipes.md (the table), recipes.json,
samples_last_snapshot.png (one row of samples per recipe) and
quality_vs_minutes.png (one line per recipe). Run a --budget-min study on an otherwise idle machine: the
budget is wall-clock time, so anything else running steals training steps from the recipe being trained;
--budget-steps gives each recipe the same steps instead (equal minutes on an idle machine, where the
recipes cost the same per step) and scores the end of each.
Rerunning with the same --out resumes: finished trainings, val mIoUs and samples are kept.
"""
from diffuseseg.cli import config_parser, run_main
from diffuseseg.io import exclusive_folder
from diffuseseg.recipe_study import STUDIES, recipe_table, run_recipe_study
from diffuseseg.runtime import configure_run, resolve_device
from diffuseseg.config import load_config


STUDY_LIST = "\n".join(f"  {name}: {', '.join(study.recipes)}" for name, study in STUDIES.items())


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2].format(studies=STUDY_LIST))
    parser.add_argument("--study", default="toy", choices=list(STUDIES), help="which set of recipes (default toy)")
    parser.add_argument("--recipes", nargs="+", default=None, help="recipes of the study to run (default: all of them)")
    parser.add_argument("--budget-min", type=float, default=10.0, help="training minutes per recipe")
    parser.add_argument("--budget-steps", type=int, default=0,
                        help="train each recipe for this many steps instead of --budget-min minutes")
    parser.add_argument("--snapshot-min", type=float, default=5.0, help="score the EMA weights every this many minutes")
    parser.add_argument("--labeled", type=int, default=20, help="labeled images for the val mIoU")
    parser.add_argument("--draws", type=int, default=2, help="label draws for the val mIoU")
    parser.add_argument("--samples", type=int, default=256, help="generated (and real) images for the sample figures")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of those samples")
    parser.add_argument("--out", default="runs/recipes", help="output folder")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)  # validates the base config before hours of training
    configure_run(cfg.run)
    with exclusive_folder(args.out):
        results = run_recipe_study(args.config, args.overrides, args.recipes or list(STUDIES[args.study].recipes),
                                   args.out, study=args.study, budget_min=args.budget_min,
                                   budget_steps=args.budget_steps,
                                   snapshot_min=args.snapshot_min, labeled=args.labeled, draws=args.draws,
                                   num_samples=args.samples, sample_steps=args.sample_steps,
                                   device=resolve_device(cfg.run.device))
    print(recipe_table(results, labeled=args.labeled, draws=args.draws, num_samples=args.samples,
                       sample_steps=args.sample_steps))
    print(f"-> {args.out}/recipes.md, quality_vs_minutes.png")


if __name__ == "__main__":
    run_main(main)
