"""The labeled-data factory: sample images from the DDPM, segment them with the ensemble in the same
run, score their uncertainty, and write (image, mask) pairs in the native labeled layout.

Pair ``i`` is a pure function of (generate.seed, i): its sampling noise comes from its own
generator. That makes the job resumable with no bookkeeping beyond the manifest: after a crash
(even ``kill -9``) a re-run keeps the pairs the manifest lists, re-creates the rest, and the result
has exactly N pairs with no duplicates or gaps. Files are written atomically and a manifest line is
appended only after its files exist.

Under ``torchrun`` the missing pairs are split into one contiguous block per rank; each rank writes
its own pairs and its own manifest shard (``manifest.rank<r>.jsonl``), and rank 0 merges the shards
into ``manifest.jsonl`` and builds ``filtered/`` once every rank is done. Shards left by a killed job
are read on the next run like the manifest itself, so it resumes whichever rank died. The result is
the same, byte for byte, whatever the number of ranks.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from diffuseseg.config import Config, official_filter_range, save_config
from diffuseseg.label_formats import ClassList, palette_image
from diffuseseg.io import atomic_save_image, atomic_write_text, exclusive_folder, remove_stale_temp_files
from diffuseseg.runtime import Distributed, barrier, batched, rank_share
from diffuseseg.sampling import generate_images
from diffuseseg.segmentation import configured_views, segment
from diffuseseg.visualize import colorize

MANIFEST = "manifest.jsonl"
SHARD_GLOB = "manifest.rank*.jsonl"


@dataclass
class FactoryResult:
    out_dir: Path
    generated: int          # pairs made by this run (the rest were already there)
    total: int
    sampling_seconds: float
    segmentation_seconds: float

    @property
    def pairs_per_second(self) -> float:
        seconds = self.sampling_seconds + self.segmentation_seconds
        return self.generated / seconds if seconds else float("nan")


def pair_name(i: int) -> str:
    return f"{i:06d}"


def read_manifest(out: Path) -> dict[int, dict]:
    """Complete records by id from the manifest and any rank shards, keeping those whose files exist;
    a torn last line (killed mid-write) is dropped."""
    records: dict[int, dict] = {}
    for path in [out / MANIFEST, *sorted(out.glob(SHARD_GLOB))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            name = pair_name(rec["id"])
            if (out / "images" / f"{name}.png").is_file() and (out / "masks" / f"{name}.png").is_file():
                records[rec["id"]] = rec
    return records


def merge_manifest(out: Path, num_images: int) -> dict[int, dict]:
    """Rewrite ``manifest.jsonl`` from everything complete (in id order, ids below ``num_images``),
    then drop the shards: torn lines and records of missing files disappear."""
    done = {i: r for i, r in read_manifest(out).items() if i < num_images}
    atomic_write_text(out / MANIFEST, "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
    for shard in out.glob(SHARD_GLOB):
        shard.unlink()
    return done


def generate_pairs(cfg: Config, model, extractor, ensemble, classes: ClassList, *, device="cpu",
                   progress: bool = True, dist_info: Distributed = Distributed()) -> FactoryResult:
    """Generate (or complete) the configured data set in ``generate.out_dir``, its only writer meanwhile
    (under torchrun: this rank's share; rank 0 holds the folder and merges)."""
    with exclusive_folder(cfg.generate.out_dir) if dist_info.is_main else nullcontext():
        return _generate_pairs(cfg, model, extractor, ensemble, classes, device=device, progress=progress,
                               dist_info=dist_info)


def _generate_pairs(cfg: Config, model, extractor, ensemble, classes: ClassList, *, device,
                    progress: bool, dist_info: Distributed) -> FactoryResult:
    g = cfg.generate
    out = Path(g.out_dir)
    if dist_info.is_main:
        remove_stale_temp_files(out)
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "classes.json", classes.to_json())
        merge_manifest(out, g.num_images)
    barrier(dist_info)
    done = {i: r for i, r in read_manifest(out).items() if i < g.num_images}
    todo = [i for i in range(g.num_images) if i not in done]
    # Pairs are made in the fixed grid of batches of one straight run (runtime.batched): a resumed or sharded
    # run recomputes the whole batch of a missing pair and writes only the missing ones, byte-identical.
    grid = [ids for ids in batched(range(g.num_images), g.batch_size) if not done.keys() >= set(ids)]
    mine = rank_share(grid, dist_info.rank, dist_info.world_size)
    shard = out / (MANIFEST if dist_info.world_size == 1 else f"manifest.rank{dist_info.rank}.jsonl")
    views = configured_views(cfg, classes.names, "test")
    t_sample = t_segment = 0.0
    made = 0
    bar = tqdm(total=g.num_images, initial=len(done), desc="pairs", unit="pair",
               disable=not (progress and dist_info.is_main))
    with shard.open("a") as manifest:
        for ids in mine:
            start = time.perf_counter()
            images = generate_images(model, cfg, len(ids), sampler=g.sampler, steps=g.steps, seed=g.seed,
                                     first_id=ids[0], batch_size=len(ids), eta=g.eta, device=device, progress=False)
            t_sample += time.perf_counter() - start
            start = time.perf_counter()
            seg = segment(extractor, ensemble, images, vote_mode=cfg.ensemble.vote, views=views, keys=ids,
                          batch_size=cfg.features.batch_size)
            t_segment += time.perf_counter() - start
            missing = [(i, image, mask, score) for i, image, mask, score
                       in zip(ids, images, seg.masks, seg.image_scores) if i not in done]
            for i, image, mask, score in missing:
                name = pair_name(i)
                atomic_save_image(Image.fromarray(image), out / "images" / f"{name}.png")
                atomic_save_image(palette_image(mask, classes.palette), out / "masks" / f"{name}.png")
                if g.save_previews:
                    atomic_save_image(Image.fromarray(colorize(mask, classes.palette)), out / "previews" / f"{name}.png")
                fractions = np.bincount(mask.reshape(-1), minlength=len(classes.names)) / mask.size
                record = {"id": i, "name": name, "seed": g.seed, "uncertainty": round(float(score), 6),
                          "class_fractions": {c: round(float(f), 5) for c, f in zip(classes.names, fractions) if f}}
                manifest.write(json.dumps(record) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())
            made += len(missing)
            bar.update(len(missing) * dist_info.world_size)
            bar.set_postfix(pairs_s=f"{made * dist_info.world_size / (t_sample + t_segment):.2f}")
    bar.close()
    barrier(dist_info)
    if dist_info.is_main:
        merge_manifest(out, g.num_images)  # id order, whatever order holes were refilled in
        write_filtered_view(out, classes, g.filter_fraction, g.filter_rule)
    barrier(dist_info)
    return FactoryResult(out, len(todo), g.num_images, t_sample, t_segment)  # timings: this rank's


def write_filtered_view(out: Path, classes: ClassList, fraction: float, rule: str = "drop_most_uncertain") -> Path:
    """``filtered/``: a subset of the pairs chosen by their uncertainty (hard links, not copies), with its
    own manifest; the raw set stays untouched.

    ``rule`` (generate.filter_rule): ``drop_most_uncertain`` leaves out the round(fraction * N) most
    uncertain pairs; ``official`` keeps the official train_deeplab.py slice of the pairs sorted by
    uncertainty, [30 : N - int(fraction * N) + 30] (``config.official_filter_range``; UserError where
    int(fraction * N) <= 30; fraction 0 keeps all, as there).
    Pairs are ranked by (uncertainty, id), so equal (6-decimal) scores are ordered by id, deterministically;
    the official np.argsort breaks ties arbitrarily.
    """
    records = sorted(read_manifest(out).values(), key=lambda r: (r["uncertainty"], r["id"]))
    if rule == "drop_most_uncertain":
        ranked = records[: len(records) - int(round(fraction * len(records)))]
    elif rule == "official":
        start, stop = official_filter_range(len(records), fraction) if fraction > 0 else (0, len(records))
        ranked = records[start:stop]
    else:
        raise ValueError(f"unknown filter rule {rule!r}; expected 'drop_most_uncertain' or 'official'")
    keep = sorted(ranked, key=lambda r: r["id"])
    view = out / "filtered"
    tmp = out / "filtered.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "masks"):
        (tmp / sub).mkdir(parents=True)
        for rec in keep:
            src = out / sub / f"{rec['name']}.png"
            try:
                os.link(src, tmp / sub / src.name)
            except OSError:
                shutil.copy2(src, tmp / sub / src.name)
    (tmp / "classes.json").write_text(classes.to_json())
    (tmp / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in keep))
    shutil.rmtree(view, ignore_errors=True)
    tmp.rename(view)
    return view
