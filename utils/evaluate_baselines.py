"""Compare DDPM features with a random-init U-Net, raw RGB+xy pixels and plain supervision, side by side.

Examples:
  python utils/evaluate_baselines.py                               # 5/10/20 labels, 3 draws, test split
  python utils/evaluate_baselines.py --split val --set features.timesteps=[50,150]   # tune on val
  python utils/evaluate_baselines.py --kinds ddpm --set ensemble.readout=conv_head   # another read-out
  python utils/evaluate_baselines.py --select kcenter              # labeled sets chosen, not drawn at random
  python utils/evaluate_baselines.py --kinds ddpm supervised fused # the read-out, supervision, both averaged
  python utils/evaluate_baselines.py --kinds ddpm supervised student  # + a student taught by them (section student)
  python utils/evaluate_baselines.py --merge runs/a "pixel MLPs=runs/b" --out runs/table   # one table of studies run apart
  python utils/evaluate_baselines.py --kinds ddpm supervised --labeled 1000 --draws 1 --score-size 256 \
      --set "labels.labeled_extra=[../shared/data/celebamask_hq_extra/labeled]"   # a pool grown into more folders

The feature kinds run through the same extractor -> read-out -> metrics code; only the features differ.
"supervised" trains train_segmenter.py's network (section segmenter) on exactly the same labeled draw;
"fused" averages the "ddpm" read-out's and that network's class probabilities per pixel (needs both kinds).
"student" trains that network on the draw plus student.unlabeled unlabeled images labeled by the teacher
(student.teacher: the ddpm read-out, or fused; needs the kinds it is made of).
Feature kinds extract the pool features of only the images the draws label; past 2 GB they are memory-mapped
from features.store_dir, so a fit on thousands of faces holds one batch in RAM. Each cell records its seconds per
fit, peak RSS and the pool features' size (study.md's cost table).
Writes --out/study.md (the table), study.json (every draw) and the resolved config.yaml after every
(kind, size) cell, so a stopped run goes on with --resume. --merge joins the
study.json of runs made apart (one per core or machine, another read-out) into one table, trains nothing.
"""
from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import load_config, save_config
from diffuseseg.io import atomic_save_image, exclusive_folder
from diffuseseg.runtime import configure_run, resolve_device
from diffuseseg.selection import SELECTION_METHODS
from diffuseseg.study import (STUDY_KINDS, StudyResult, check_kinds, check_resumable, label_curve_chart,
                              merge_studies, read_study, run_study, save_study)


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--labeled", type=int, nargs="+", default=[5, 10, 20], help="labeled-set sizes")
    parser.add_argument("--draws", type=int, default=3, help="random label draws per size")
    parser.add_argument("--kinds", nargs="+", default=list(STUDY_KINDS), choices=STUDY_KINDS)
    parser.add_argument("--split", default="test", choices=["val", "test"],
                        help="evaluation split: tune on val, report on test")
    parser.add_argument("--select", default="random", choices=SELECTION_METHODS,
                        help="how each labeled set is drawn from the pool: at random, a diverse set by greedy "
                             "k-center on the DDPM's features (seeded per draw), or the first k (what the main job "
                             "labels; draws then differ only in training seeds)")
    parser.add_argument("--score-size", type=int, default=0, metavar="PX",
                        help="also score every prediction at PX px: class probabilities upsampled bilinearly against "
                             "masks read at PX px from the files (256: the paper's CelebA protocol); 0 = off")
    parser.add_argument("--out", default="runs/baselines", help="output folder")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the study that a stopped run left in --out (its study.json holds every "
                             "finished (kind, size) cell; the config must match)")
    parser.add_argument("--merge", nargs="+", metavar="[TAG=]DIR",
                        help="write one table from these study folders and stop: TAG names a folder's rows; rows of "
                             "one name join when their sizes differ (one process per size)")
    parser.add_argument("--plot", action="store_true",
                        help="also draw --out/curve.png: mIoU against labeled images on a log axis, one line per row "
                             "(and curve_<PX>px.png for --score-size)")
    parser.add_argument("--ceiling", default="", metavar="[ROW=]N",
                        help="with --plot: draw ROW (default: supervised) at N labels (all the labeled faces) as the "
                             "ceiling, e.g. 3111 or 'supervised [12k steps]=3111' for a longer fit merged in by that tag")
    args = parser.parse_args()
    ceiling_row, _, ceiling = args.ceiling.rpartition("=")
    if ceiling and not ceiling.isdigit():
        parser.error(f"--ceiling {args.ceiling!r}: expected N or ROW=N, N a number of labeled images")
    args.ceiling, args.ceiling_row = int(ceiling or 0), ceiling_row or "supervised"
    if args.merge:
        merged = merge_studies([read_study(item) for item in args.merge])
        with exclusive_folder(args.out):
            out = save_study(merged, args.out)
            if args.plot:
                save_curves(merged, out, args.ceiling, args.ceiling_row)
        print(merged.markdown())
        print(f"-> {out}")
        return
    cfg = config_from_args(args)
    try:
        check_kinds(args.kinds, cfg.student.teacher)
    except ValueError as err:
        parser.error(f"--kinds: {err}")
    configure_run(cfg.run)
    with exclusive_folder(args.out) as out:
        done = None
        if args.resume and (out / "study.json").exists():
            _, done = read_study(str(out))
            check_resumable(done, cfg, load_config(out / "config.yaml"), args.split, args.draws, args.select, out,
                            args.score_size)
            print(f"resuming {out}: {sum(map(len, done.miou.values()))} (kind, size) cells done")

        def save(partial: StudyResult) -> None:  # after every cell: a stopped run resumes with --resume
            save_study(partial, out)
            save_config(cfg, out / "config.yaml")

        result = run_study(cfg, args.kinds, args.labeled, args.draws, args.split, resolve_device(cfg.run.device),
                           selection=args.select, done=done, on_cell=save, score_size=args.score_size)
        save(result)
        if args.plot:
            save_curves(result, out, args.ceiling, args.ceiling_row)
    print(result.markdown())
    print(f"({result.seconds:.0f} s) -> {out}")


def save_curves(result: StudyResult, out, ceiling: int, ceiling_row: str = "supervised") -> None:
    """curve.png, and curve_<PX>px.png per larger scoring size, beside study.md."""
    for side in [0, *sorted(result.miou_at)]:
        name = f"curve_{side}px.png" if side else "curve.png"
        atomic_save_image(label_curve_chart(result, ceiling, side, ceiling_row), out / name)


if __name__ == "__main__":
    run_main(main)
