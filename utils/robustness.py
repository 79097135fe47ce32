"""Measure how the trained read-out holds up on test faces framed unlike its training faces.

Examples:
  python utils/robustness.py --config configs/celebamask_hq64.yaml      # the bundled real-face read-out
  python utils/robustness.py --shift 0.2 --zoom-out 0.3 --out runs/robustness_strong

Segments the labeled test split (labels.test_dir) as it is, shifted right and down by --shift of the side,
zoomed out by --zoom-out about the centre, and mirrored (left/right parts swap names in the ground truth),
each made from the full-resolution files; the uncovered border is grey and not scored. Reports mIoU, the
mean per-image uncertainty (segment.py's uncertainty.csv score) and its Spearman rank correlation with
per-image mIoU. Writes --out/robustness.md (the table), robustness.json (per image too), robustness.png
(per framing: image | ground truth | prediction) and the resolved config.yaml.

--photos measures segment.py's photo path instead (issue 43): each face made into photos as people take
them (as is; shifted 10 % and 25 %; zoomed out 20 % and 50 % on a 256 px canvas; rotated 15 and 30 degrees;
two faces side by side; a 3:4 portrait with the face off-centre), segmented with alignment off
(segment.crop's framing) and with each --finders entry, scored at the photo's size against the
transformed truth (grey canvas: not scored; a pixel the model never saw counts as background), each finder's
difference to alignment off given with a 95 % paired bootstrap interval over the faces. One more
column, "as-is masks carried", moves the first finder's masks of the as-is photos along each variant's own
transform: what perfect alignment would score, so that what a frame costs the metric itself (parts cut off,
a face scored at a fifth of the size) is told apart from what finding and aligning cost; --placed adds "placed
by the truth", the read-out of crops placed where each face truly is (between it and the finder's column lies
what finding costs, between it and the carried one what the read-out loses to seeing only the photo):
  python utils/robustness.py --config configs/celebamask_hq64.yaml --photos --split val \
      --finders readout checkpoints/face_finder_64/segmenter.pt
Writes --out/robustness_photos.md, robustness_photos.json and robustness_photos.png. --write-photos DIR only
writes those photos (PNG) and their truth (index PNG), e.g. to try segment.py on them:
  python utils/robustness.py --config configs/celebamask_hq64.yaml --write-photos runs/photos --limit 2 \
      --photo-variants two_faces rotate_30 portrait
  python utils/segment.py --config configs/celebamask_hq64.yaml --set segment.input_dir=runs/photos/images
"""
import json
from pathlib import Path

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import save_config
from diffuseseg.datasets import labeled_split
from diffuseseg.io import exclusive_folder
from diffuseseg.io import atomic_write_text
from diffuseseg.photo_faces import (FaceSegmenter, configured_settings, load_canonical, load_finder,
                                    load_refiner)
from diffuseseg.robustness import (PHOTO_VARIANTS, VARIANTS, aligned_photo_losses, landmark_errors, landmark_table,
                                   photo_table, run_photo_robustness, run_robustness, save_robustness,
                                   write_photo_variants)
from diffuseseg.runtime import configure_run, resolve_device
from diffuseseg.segmentation import configured_views, load_trained_stack


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--shift", type=float, default=0.1, help="shift, as a share of the side (default 0.1)")
    parser.add_argument("--zoom-out", type=float, default=0.2, help="zoom-out, as a share of the side (default 0.2)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default=None, help="output folder (default: segment.out_dir + '_robustness')")
    parser.add_argument("--photos", action="store_true", help="the photo table of segment.py's face path (above)")
    parser.add_argument("--finders", nargs="+", default=None, metavar="FINDER",
                        help="--photos: 'readout' and/or face parser files to compare (default: segment.finder)")
    parser.add_argument("--photo-variants", nargs="+", default=list(PHOTO_VARIANTS), choices=PHOTO_VARIANTS)
    parser.add_argument("--no-off", action="store_true", help="--photos: leave out the alignment-off column")
    parser.add_argument("--placed", action="store_true",
                        help="--photos: one more column, the first finder's read-out of crops placed where the "
                             "truth says each face is (perfect finding; the read-out still sees only the photo)")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="which labeled faces (default test)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N faces of the split")
    parser.add_argument("--write-photos", metavar="DIR", help="only write the photo variants to DIR (above)")
    parser.add_argument("--landmarks", action="store_true",
                        help="--photos: instead of segmenting, how far each face's crop lies from where its truth "
                             "mask's landmarks put it, for the finder refining itself and for segment.refiner "
                             "(one-face variants; no read-out: seconds)")
    args = parser.parse_args()
    if not 0 <= args.shift < 1:
        parser.error(f"--shift {args.shift}: expected a share of the side in [0, 1)")
    if not 0 <= args.zoom_out < 1:
        parser.error(f"--zoom-out {args.zoom_out}: expected a share of the side in [0, 1)")
    cfg = config_from_args(args)
    configure_run(cfg.run)
    if args.write_photos:
        count = write_photo_variants(labeled_split(cfg, args.split), args.write_photos, args.photo_variants,
                                     cfg.labels.ignore_index, args.limit)
        print(f"{count} photos -> {args.write_photos}/images (truth: masks/)")
        return
    extractor, readout, classes = load_trained_stack(cfg, resolve_device(cfg.run.device))
    split = labeled_split(cfg, args.split)
    out = Path(args.out or f"{cfg.segment.out_dir.rstrip('/')}_robustness")
    if args.photos and args.landmarks:
        return landmarks_table(cfg, args, extractor, readout, classes, split, out)
    if args.photos:
        return photos_table(cfg, args, extractor, readout, classes, split, out)
    with exclusive_folder(out):
        result = run_robustness(extractor, readout, split, cfg.labels.ignore_index, variants=args.variants,
                                shift=args.shift, zoom_out=args.zoom_out, vote_mode=cfg.ensemble.vote,
                                views=configured_views(cfg, classes.names, "test"),
                                batch_size=cfg.features.batch_size, picture=out / "robustness.png")
        save_robustness(result, out)
        save_config(cfg, out / "config.yaml")
    print(result.markdown())
    print(f"-> {out}")


def photos_table(cfg, args, extractor, readout, classes, split, out: Path) -> None:
    views = configured_views(cfg, classes.names, "test")
    common = configured_settings(cfg, extractor, readout, classes, views)
    segmenters = {} if args.no_off else {"off": FaceSegmenter(finder=None, finder_classes=[], align_faces=False,
                                                                **common)}
    finders = []
    for spec in args.finders or [cfg.segment.finder]:
        finder, names = load_finder(cfg, extractor, readout, classes, views, spec)
        finders.append("readout" if spec == "readout" else Path(spec).parent.name or spec)
        segmenters[finders[-1]] = FaceSegmenter(finder=finder, finder_classes=names, **common)
    with exclusive_folder(out):
        # the first finder's as-is masks carried along each variant: what perfect alignment would score
        carry = finders[0] if "as_is" in args.photo_variants else None
        results = run_photo_robustness(segmenters, split, cfg.labels.ignore_index, variants=args.photo_variants,
                                       limit=args.limit, chunk=cfg.features.batch_size,
                                       picture=out / "robustness_photos.png", carry=carry,
                                       baseline=None if args.no_off else "off",
                                       placed=finders[0] if args.placed else None)
        faces = len(next(iter(next(iter(results.values())).values())).per_image_miou)
        table = photo_table(results, faces, "off")
        losses = aligned_photo_losses(results, "off")
        if losses:
            table += "\n\nWhere each difference on the as-is photos lies (robustness.aligned_photo_losses):\n" + losses
        atomic_write_text(out / "robustness_photos.md", table + "\n")
        atomic_write_text(out / "robustness_photos.json", json.dumps(
            {name: {v: vars(r) for v, r in rows.items()} for name, rows in results.items()}, indent=1))
        save_config(cfg, out / "config.yaml")
    print(table)
    print(f"-> {out}")


def landmarks_table(cfg, args, extractor, readout, classes, split, out: Path) -> None:
    views = configured_views(cfg, classes.names, "test")
    finder, names = load_finder(cfg, extractor, readout, classes, views)
    refiners = {"the finder": None}
    if cfg.segment.refiner:
        refiners[cfg.segment.refiner] = load_refiner(cfg, extractor, readout, classes, views)
    variants = [v for v in args.photo_variants if v != "two_faces"]
    errors = landmark_errors(split, finder, names, refiners, load_canonical(cfg), cfg.model.im_size,
                             cfg.labels.ignore_index, variants=variants, limit=args.limit, refine=cfg.segment.refine)
    table = landmark_table(errors)
    with exclusive_folder(out):
        atomic_write_text(out / "landmark_errors.md", table + "\n")
        save_config(cfg, out / "config.yaml")
    print(table)
    print(f"-> {out}")


if __name__ == "__main__":
    run_main(main)
