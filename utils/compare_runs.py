"""Compare evaluation runs side by side: per-class IoU and mIoU, mean ± std over each group's runs.

Examples:
  # a segmenter trained on factory pairs vs on 20 real images, 3 seeds each
  python utils/compare_runs.py "1000 factory pairs=runs/segmenter/factory1000_s*" \\
      "20 real=runs/segmenter/real20_s0,runs/segmenter/real20_s1,runs/segmenter/real20_s2"
  python utils/compare_runs.py "ensemble=runs/segment" --out runs/compare.md

Each GROUP is LABEL=PATHS: comma-separated run folders holding a metrics.json (as train_segmenter.py and
segment.py write), or metrics files themselves; shell-style wildcards are expanded here (quote them).
Prints a markdown table, one column per group; cells are mean ± std (population) over the group's runs.
"""
import argparse
import glob

from diffuseseg.cli import run_main
from diffuseseg.errors import UserError
from diffuseseg.io import atomic_write_text
from diffuseseg.metrics import compare_reports, load_report


def parse_group(text: str) -> tuple[str, list[str]]:
    label, sep, paths = text.partition("=")
    if not sep or not label or not paths:
        raise UserError(f"group {text!r}: expected LABEL=PATH[,PATH...]")
    found = []
    for pattern in paths.split(","):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"group {label!r}: {pattern!r} matches nothing")
        found += matches
    return label, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", metavar="GROUP", help="LABEL=PATH[,PATH...] (see below)")
    parser.add_argument("--out", metavar="FILE", default=None, help="also write the table to this file")
    args = parser.parse_args()
    groups = {}
    for text in args.groups:
        label, paths = parse_group(text)
        if label in groups:
            raise UserError(f"group label {label!r} given twice")
        groups[label] = [load_report(p) for p in paths]
    try:
        table = compare_reports(groups)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n")


if __name__ == "__main__":
    run_main(main)
