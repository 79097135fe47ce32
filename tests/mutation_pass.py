"""A hand-written mutation pass over the core: plant one plausible bug at a time in a copy of the repo, run the
tests that cover that module, and report which bugs the suite catches (killed) and which it misses (survived).

    python tests/mutation_pass.py                    # every mutant (about 15 min on 2 CPU cores)
    python tests/mutation_pass.py --only M1 S4       # some of them
    python tests/mutation_pass.py --out docs/mutation_pass.md

The working tree is never touched: the committed files (HEAD, or --rev) are copied to a temporary folder beside
a link to ../shared (so the fixture tests run, not skip). A mutant whose text is not found exactly once
is reported as stale: the code moved and the mutant must be updated.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str       # relative to utils/diffuseseg/
    old: str
    new: str
    bug: str        # the plausible bug, in words
    tests: tuple[str, ...]


METRICS = ("tests/test_metrics.py",)
PREDICTION = ("tests/test_pixel_classifier.py",)
FILTER = ("tests/test_factory.py", "tests/test_config.py")
SAMPLERS = ("tests/test_diffusion.py",)
FEATURES = ("tests/test_features.py", "tests/test_feature_store.py")
ALIGN = ("tests/test_face_align.py",)
VIEWS = ("tests/test_views.py",)

MUTANTS = [
    # metrics
    Mutant("M1", "metrics.py", "union = conf.sum(-2) + conf.sum(-1) - intersection", "union = conf.sum(-2) + conf.sum(-1)",
           "union counts the intersection twice", METRICS),
    Mutant("M2", "metrics.py", "target * num_classes + pred", "pred * num_classes + target",
           "confusion matrix transposed (rows = prediction)", METRICS),
    Mutant("M3", "metrics.py", "keep = target != ignore_index", "keep = target == target",
           "ignored pixels are counted", METRICS),
    Mutant("M4", "metrics.py", "return float(iou_per_class(conf)[_counted(len(conf), ignore_index)].mean())",
           "return float(iou_per_class(conf)[_counted(len(conf), ignore_index) & ((conf.sum(0) + conf.sum(1)) > 0)]"
           ".mean())", "absent classes left out of the dataset mIoU (official: they count as 0)", METRICS),
    Mutant("M5", "metrics.py", "counted[ignore_index] = False", "counted[ignore_index] = True",
           "an ignore_index that is a class id stays in the mean", METRICS),
    Mutant("M6", "metrics.py", "present = ((conf.sum(0) + conf.sum(1)) > 0) &", "present = (conf.sum(0) >= 0) &",
           "per-image mIoU over every class, not the present ones", METRICS),
    Mutant("M7", "metrics.py", "return intersection / (1e-8 + union)", "return intersection / (1.0 + union)",
           "IoU smoothed by 1 instead of 1e-8", METRICS),
    Mutant("M8", "metrics.py", "return float(np.trace(conf) / total) if total else math.nan",
           "return float(np.trace(conf) / conf.sum(1).max()) if total else math.nan",
           "pixel accuracy over the largest class's pixels", METRICS),
    # vote and uncertainty
    Mutant("V1", "pixel_classifier/prediction.py", "return counts.argmax(1)  #",
           "return counts.shape[1] - 1 - counts.flip(1).argmax(1)  #", "vote ties go to the highest class id",
           PREDICTION),
    Mutant("V2", "pixel_classifier/prediction.py", "labels = logits.argmax(-1)  # (E, N)",
           "labels = logits.softmax(-1).mean(0, keepdim=True).expand(logits.shape[0], -1, -1).argmax(-1)",
           "majority vote replaced by the mean softmax", PREDICTION),
    Mutant("U1", "pixel_classifier/prediction.py", "return (mixture_entropy - member_entropy).clamp_min(0.0)",
           "return mixture_entropy.clamp_min(0.0)", "uncertainty = entropy of the mean, not Jensen-Shannon",
           PREDICTION),
    Mutant("U2", "pixel_classifier/prediction.py", "log_p = torch.as_tensor(logits).float().log_softmax(-1)",
           "log_p = torch.as_tensor(logits).float().log_softmax(0)", "softmax over the members, not the classes",
           PREDICTION),
    Mutant("U3", "pixel_classifier/prediction.py", "k = js.numel() // 10", "k = js.numel() // 5",
           "image score over the top 20 % of pixels, not 10 %", PREDICTION),
    Mutant("U4", "pixel_classifier/prediction.py", "js.topk(k).values", "js.topk(k, largest=False).values",
           "image score over the least uncertain pixels", PREDICTION),
    # the filtered view
    Mutant("F1", "factory.py", "ranked = records[: len(records) - int(round(fraction * len(records)))]",
           "ranked = records[int(round(fraction * len(records))):]", "the filter keeps the most uncertain pairs",
           FILTER),
    Mutant("F2", "config.py", "return OFFICIAL_FILTER_SKIP, n - drop + OFFICIAL_FILTER_SKIP",
           "return OFFICIAL_FILTER_SKIP, n - drop", "official slice ends 30 pairs early", FILTER),
    Mutant("F3", "config.py", "drop = int(n * fraction)", "drop = round(n * fraction)",
           "official drop count rounded, not truncated", FILTER),
    Mutant("F4", "factory.py", 'key=lambda r: (r["uncertainty"], r["id"])', 'key=lambda r: (r["uncertainty"], -r["id"])',
           "equal scores ordered by descending id", FILTER),
    # samplers
    Mutant("S1", "diffusion.py", "var = max((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, 1e-20)",
           "var = max(beta_t, 1e-20)", "DDPM variance beta_t instead of beta-tilde", SAMPLERS),
    Mutant("S2", "diffusion.py", "if t > 0:  # the last step", "if t >= 0:  # the last step",
           "DDPM adds noise on the last step", SAMPLERS),
    Mutant("S3", "diffusion.py", "c_xt = math.sqrt(alpha_t) *", "c_xt = alpha_t *",
           "posterior mean coefficient without the square root", SAMPLERS),
    Mutant("S4", "diffusion.py", "std = eta * math.sqrt(max(var, 0.0))", "std = eta * max(var, 0.0)",
           "DDIM sigma is the variance, not the std", SAMPLERS),
    Mutant("S5", "diffusion.py", "math.sqrt(max(1.0 - abar_prev - std**2, 0.0)) * eps",
           "math.sqrt(max(1.0 - abar_prev, 0.0)) * eps", "DDIM direction ignores sigma", SAMPLERS),
    Mutant("S6", "diffusion.py", "ts = (np.arange(N) * (T // N))[::-1]", "ts = (np.arange(N) * (T // N) + 1)[::-1]",
           "leading spacing off by one", SAMPLERS),
    Mutant("S7", "diffusion.py", "ts = np.round(np.arange(T, 0, -T / N)) - 1", "ts = np.floor(np.arange(T, 0, -T / N)) - 1",
           "trailing spacing floors instead of rounding", SAMPLERS),
    Mutant("S8", "diffusion.py", "self.final_alpha_cumprod = 1.0 if set_alpha_to_one else schedule.alpha_bar(0)",
           "self.final_alpha_cumprod = schedule.alpha_bar(0)", "set_alpha_to_one ignored", SAMPLERS),
    Mutant("S9", "diffusion.py", "use_clipped_model_output=False).\n            x0 = x0.clamp(",
           "use_clipped_model_output=False).\n            x0 = x0 + 0 * x0.clamp(", "DDIM never clips x0", SAMPLERS),
    Mutant("S10", "diffusion.py", "return a * x0 + b * noise", "return a * x0 + (1 - a) * noise",
           "forward process noise scaled by 1 - sqrt(abar)", SAMPLERS),
    Mutant("S11", "diffusion.py", "return a * noise - b * x0", "return a * noise + b * x0", "v target sign",
           SAMPLERS),
    # feature layout
    Mutant("L1", "features.py", "return [outs[name][i * b:(i + 1) * b] for i in range(n_t) for name in self.blocks]",
           "return [outs[name][i::n_t] for i in range(n_t) for name in self.blocks]",
           "features of different images and timesteps mixed (the batch is timestep-major)", FEATURES),
    Mutant("L2", "features.py", "return [outs[name][i * b:(i + 1) * b] for i in range(n_t) for name in self.blocks]",
           "return [outs[name][i * b:(i + 1) * b] for i in range(n_t) for name in sorted(self.blocks)]",
           "blocks concatenated in sorted order, not the listed one", FEATURES),
    Mutant("L3", "features.py", 'F.interpolate(m, size=size, mode="bilinear", align_corners=False)',
           'F.interpolate(m, size=size, mode="nearest")',
           "nearest up-sampling instead of bilinear", FEATURES),
    Mutant("L4", "features.py", 'F.interpolate(m, size=size, mode="bilinear", align_corners=False)',
           'F.interpolate(m, size=size, mode="bilinear", align_corners=True)',
           "align_corners=True", FEATURES),
    Mutant("L5", "features.py", "return one.expand(len(keys), *shape).clone()",
           "return torch.randn((len(keys), *shape), generator=torch.Generator().manual_seed(seed))",
           "'shared' noise differs per image", FEATURES),
    Mutant("L6", "features.py", "t = torch.tensor(self.timesteps, device=self.device).repeat_interleave(b)",
           "t = torch.tensor(self.timesteps, device=self.device).repeat(b)",
           "timesteps paired with the wrong copies of the images", FEATURES),
    # face alignment: the plain framing's second opinion (segment.snap_plain_sd)
    Mutant("A1", "face_align.py", "limits = np.array([snap_sd, band, band, band])",
           "limits = np.array([band, band, band, band])",
           "the second opinion lets a face of another scale keep the plain framing", ALIGN),
    Mutant("A2", "face_align.py", "if marks is None or np.isnan(marks).any():", "if marks is None:",
           "a fit without an eye decides the second opinion", ALIGN),
    # views
    Mutant("W1", "views.py", "out = out.flip(axis + 1)[..., class_order[:out.shape[-1]]]", "out = out.flip(axis + 1)",
           "a mirrored view's scores mapped back without swapping l/r classes", VIEWS),
]


def copy_repo(dest: Path, rev: str) -> Path:
    """The repo's files at commit ``rev`` (uncommitted edits never leak in), plus a link to ../shared."""
    root = dest / "repo"
    root.mkdir()
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    if (REPO.parent / "shared").is_dir():
        os.symlink(REPO.parent / "shared", dest / "shared")
    return root


def run_tests(root: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float]:
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=root, capture_output=True, text=True, timeout=timeout)
        outcome = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        outcome = "timeout"
    return outcome, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    parser.add_argument("--rev", default="HEAD", help="the commit to mutate (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run (default: %(default)s)")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root = copy_repo(Path(tmp), args.rev)
        suites = sorted({m.tests for m in mutants})
        for tests in suites:  # the unmutated code must pass, or a "kill" means nothing
            outcome, _ = run_tests(root, tests, args.timeout)
            if outcome != "passed":
                sys.exit(f"the unmutated tests {' '.join(tests)} do not pass ({outcome}); fix them first")
        for m in mutants:
            path = root / "utils" / "diffuseseg" / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                rows.append((m, "stale", 0.0))
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                outcome, seconds = run_tests(root, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = {"failed": "killed", "passed": "SURVIVED", "timeout": "killed (timeout)"}[outcome]
            rows.append((m, verdict, seconds))
            print(f"{m.id:4s} {verdict:16s} {seconds:6.1f} s  {m.bug}", flush=True)
    killed = sum(v.startswith("killed") for _, v, _ in rows)
    table = ["| id | module | planted bug | tests run | verdict |", "|---|---|---|---|---|"]
    table += [f"| {m.id} | `{m.file}` | {m.bug} | {', '.join(t.removeprefix('tests/') for t in m.tests)} | {v} |"
              for m, v, _ in rows]
    summary = f"{killed} of {len(rows)} mutants killed"
    print("\n".join(table) + f"\n\n{summary}")
    if args.out:
        args.out.write_text("\n".join(table) + f"\n\n{summary}\n")


if __name__ == "__main__":
    main()
