"""Summarise a DDPM run's train_log.jsonl as a markdown table: loss, learning rate and throughput at a
few steps, the median throughput and the steps and images seen.

Examples:
  python utils/train_log_summary.py runs/ddpm/train_log.jsonl
  python utils/train_log_summary.py runs/ddpm/train_log.jsonl --rows 12
"""
import argparse
import json
import statistics
from pathlib import Path

from diffuseseg.cli import run_main
from diffuseseg.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="a train_log.jsonl written by utils/train_ddpm.py")
    parser.add_argument("--rows", type=int, default=8, help="table rows, evenly spaced over the run")
    args = parser.parse_args()
    if not args.log.is_file():
        raise UserError(f"training log not found: {args.log}")
    try:
        records = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UserError(f"{args.log}: not a train_log.jsonl ({err})") from None
    if not records:
        raise UserError(f"{args.log} holds no log records")
    picks = sorted({round(i * (len(records) - 1) / max(1, args.rows - 1)) for i in range(args.rows)})
    print("| step | loss (mean of the logging window) | learning rate | img/s |\n|---|---|---|---|")
    for i in picks:
        r = records[i]
        print(f"| {r['step']} | {r['loss']:.4f} | {r['lr']:.2e} | {r['img_per_s']:.1f} |")
    print(f"\n{records[-1]['step']} steps; median throughput {statistics.median(r['img_per_s'] for r in records):.1f} "
          f"img/s over {len(records)} logging windows.")


if __name__ == "__main__":
    run_main(main)
