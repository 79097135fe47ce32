"""Convert a labeled folder to another class list by class NAME, written in the native index layout.

Examples:
  # DiffuseSeg's RGB palette masks -> CelebAMask-HQ ids (images/, masks/ index PNGs, classes.json)
  python utils/convert_labels.py ../shared/data/celebahq64_sample data/celebahq64_cmhq \\
      --format palette --from diffuseseg --to celebamask_hq
  # the raw CelebAMask-HQ download -> ddpm-segmentation's celeba_19 order, 64 px
  python utils/convert_labels.py /data/CelebAMask-HQ data/celeba19_64 --format celebamask_hq --to celeba19 --size 64
  # only show how the classes would map
  python utils/convert_labels.py SRC DST --format palette --from diffuseseg --to celeba19 --dry-run

Input formats (--format): index (images/ + masks/ index PNGs + classes.json), palette (images/ + masks/
RGB PNGs in the class palette), celebamask_hq (CelebA-HQ-img/ + CelebAMask-HQ-mask-anno/), ddpm_segmentation
(<name>.png + <name>.npy). A class list (--from, --to) is a JSON file ({"names": [...], "palette": [...]})
or a built-in name: diffuseseg (20), celebamask_hq (19, official ids), celeba19 (ddpm-segmentation order).

Classes map by identical name, then by synonym: background = bg, neck_l = necklace, ear_r = earring
(DiffuseSeg's ear_r and earring both become CelebAMask-HQ's ear_r). A source class with no counterpart
becomes --unmapped: ignore (255, left out of training and scoring) or background. The mapping table is
printed before anything is written.
"""
import argparse
from pathlib import Path

from diffuseseg.cli import run_main
from diffuseseg.errors import DataError
from diffuseseg.io import LOCK_FILE, exclusive_folder
from diffuseseg.label_formats import (BUILTIN_CLASSES, class_mapping, convert_labeled_folder, resolve_classes)

FORMATS = ("index", "palette", "celebamask_hq", "ddpm_segmentation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="the labeled folder to read")
    parser.add_argument("dst", type=Path, help="the folder to write (images/, masks/, classes.json)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of SRC")
    parser.add_argument("--from", dest="src_classes", default="", metavar="CLASSES",
                        help="SRC's class list: JSON path or built-in name "
                             f"({', '.join(k for k in BUILTIN_CLASSES if k != 'celeba_19')}); default: "
                             "SRC/classes.json (celebamask_hq: its official 19 classes)")
    parser.add_argument("--to", dest="dst_classes", required=True, metavar="CLASSES",
                        help="the class list to write: JSON path or built-in name")
    parser.add_argument("--unmapped", choices=("ignore", "background"), default="ignore",
                        help="where a source class with no counterpart goes (default: %(default)s = 255)")
    parser.add_argument("--size", type=int, default=0, metavar="S",
                        help="resize and centre-crop to SxS (images smooth, masks nearest); 0 = keep (default)")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="convert only the first N images (by name)")
    parser.add_argument("--overwrite", action="store_true", help="write into a DST that already holds files")
    parser.add_argument("--dry-run", action="store_true", help="print the class mapping and stop")
    args = parser.parse_args()

    src_classes = resolve_classes(args.src_classes, args.src, args.format)
    dst_classes = resolve_classes(args.dst_classes, args.dst)
    _, report = class_mapping(src_classes, dst_classes, args.unmapped)
    print("\n".join(report))
    if args.dry_run:
        return
    if args.size < 0 or args.limit < 0:
        raise DataError("--size and --limit must be >= 0")
    if args.dst.exists() and any(p.name != LOCK_FILE for p in args.dst.iterdir()) and not args.overwrite:
        raise DataError(f"{args.dst} is not empty (use --overwrite to write into it)")
    with exclusive_folder(args.dst):
        stats = convert_labeled_folder(args.src, args.dst, args.format, src_classes, dst_classes, args.unmapped,
                                       args.size, args.limit,
                                       progress=lambda done, total: print(f"\r{done}/{total} images", end="",
                                                                          flush=True))
    print()
    note = f"; {stats['unmapped_pixels']} pixels had no counterpart ({args.unmapped})" if stats["unmapped_pixels"] else ""
    print(f"wrote {stats['images']} images -> {args.dst}{note}")
    if stats["unmapped_pixels"] and args.unmapped == "ignore":
        print("the masks hold the ignore value 255 where a class had no counterpart")


if __name__ == "__main__":
    run_main(main)
