"""The scripts that use a trained stack, run for real on a tiny DDPM: DiffuseSeg MLP files driving
segment.py / generate_dataset.py, and generation that survives kill -9."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_script
from diffuseseg.config import ConfigError, load_config, official_filter_range
from diffuseseg.errors import UserError
from diffuseseg.factory import pair_name, write_filtered_view
from diffuseseg.label_formats import ClassList
from diffuseseg.pixel_classifier import PixelEnsemble, load_diffuseseg_mlps, load_ensemble, save_ensemble
from diffuseseg.segmentation import build_extractor, configured_views, segment
from diffuseseg.toy_faces import CLASS_NAMES, PALETTE, render_faces


def test_diffuseseg_weights_drive_segment_and_sample_scripts(stack, tmp_path, one_thread):
    images = render_faces([2, 0, 1], 16, seed=0)[0]  # this order: file order is not the order of uncertainty
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"face{i}.png")
    proc = run_script("segment.py", stack["overrides"] + [f"segment.input_dir={tmp_path}", "segment.align=none",
                                                         f"segment.out_dir={tmp_path / 'out'}"])
    assert proc.returncode == 0, proc.stderr
    written = np.stack([np.asarray(Image.open(tmp_path / "out" / "masks" / f"face{i}.png")) for i in range(3)])

    mlps = load_diffuseseg_mlps(sorted((stack["root"] / "mlps").iterdir()))
    views = configured_views(stack["cfg"], CLASS_NAMES, "test")
    # Computed as segment.py does (its vote, batch size and run.threads=1: the one_thread fixture): the masks
    # and the 6-decimal scores below are compared exactly, and another thread count or batch size may change
    # float bits (and so an argmax or a rounded digit) on some CPUs.
    cfg = stack["cfg"]
    assert cfg.run.threads == torch.get_num_threads() == 1
    result = segment(build_extractor(cfg), mlps, images, views=views, vote_mode=cfg.ensemble.vote,
                     batch_size=cfg.features.batch_size)
    expected = result.masks
    np.testing.assert_array_equal(written, expected)
    assert len(np.unique(expected)) > 1  # the check means something only if the MLPs vary by pixel
    # The colour masks and the overlays: the palette colours, and half image / half colour (rounded).
    palette = np.asarray(PALETTE, np.uint8)
    for i, image in enumerate(images):
        colour = np.asarray(Image.open(tmp_path / "out" / "colour" / f"face{i}.png"))
        np.testing.assert_array_equal(colour, palette[expected[i]])
        blend = np.asarray(Image.open(tmp_path / "out" / "overlay" / f"face{i}.png"))
        assert blend.shape == (16, 16, 3)
        np.testing.assert_array_equal(blend, ((image.astype(np.float32) + palette[expected[i]]) / 2).round())
    # uncertainty.csv: a header, then one row per image in input order with its top-10% score (6 decimals).
    scores = result.image_scores
    rows = (tmp_path / "out" / "uncertainty.csv").read_text().splitlines()
    assert rows == ["name,uncertainty"] + [f"face{i},{scores[i]:.6f}" for i in range(3)], rows
    assert np.isfinite(scores).all() and (scores > 0).all()
    assert sorted(scores.tolist()) not in (scores.tolist(), scores.tolist()[::-1])  # so the order is checked

    proc = run_script("sample_ddpm.py", stack["overrides"] + [f"sample.out_dir={tmp_path / 'samples'}",
                                                             "sample.num_images=2", "sample.steps=2"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_mlp_files_for_other_features_or_classes_are_refused(stack, tmp_path):
    folder = tmp_path / "mlps"
    folder.mkdir()
    for k, sd in enumerate(PixelEnsemble(stack["dim"] + 1, len(CLASS_NAMES), members=2,
                                         layer_order="diffuseseg").to_member_state_dicts(), start=1):
        torch.save(sd, folder / f"mlp_{k}_best.pt")
    proc = run_script("segment.py", stack["overrides"] + [f"ensemble.path={folder}"])
    assert proc.returncode == 2 and f"take {stack['dim'] + 1} features" in proc.stderr, proc.stderr
    assert str(folder) in proc.stderr and "Traceback" not in proc.stderr

    proc = run_script("segment.py", stack["overrides"] + [f"ensemble.path={tmp_path}"])
    assert proc.returncode == 2 and "no pixel-MLP files" in proc.stderr, proc.stderr

    proc = run_script("segment.py", stack["overrides"] + ["features.blocks=[ups.0,ups.7]"])
    assert proc.returncode == 2 and "features.blocks: ['ups.7'] not in this U-Net" in proc.stderr, proc.stderr


def read_pairs(out: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    names = [r["name"] for r in records]
    images = np.stack([np.asarray(Image.open(out / "images" / f"{n}.png").convert("RGB")) for n in names])
    masks = np.stack([np.asarray(Image.open(out / "masks" / f"{n}.png")) for n in names])
    return records, images, masks


def test_generation_killed_mid_run_resumes_to_exactly_n_pairs(stack, tmp_path):
    n = 12  # 100 sampler steps: nine pairs (~2 s) remain after the third, so the kill lands mid-run
    overrides = stack["overrides"] + ["generate.num_images=12", "generate.batch_size=2", "generate.steps=100"]
    straight = run_script("generate_dataset.py", overrides + [f"generate.out_dir={tmp_path / 'straight'}"])
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    proc = run_script("generate_dataset.py", overrides + [f"generate.out_dir={out}"], wait=False)
    manifest, deadline = out / "manifest.jsonl", time.time() + 120
    while not (manifest.is_file() and manifest.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup handlers run
    proc.wait()
    assert proc.returncode != 0, "generation finished before it could be killed"
    done_before = manifest.read_text().count("\n")
    assert 3 <= done_before < n

    resumed = run_script("generate_dataset.py", overrides + [f"generate.out_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"({n - done_before} new)" in resumed.stdout, resumed.stdout
    records, images, masks = read_pairs(out)
    assert [r["id"] for r in records] == list(range(n))  # no duplicates, no gaps
    assert len(list((out / "images").iterdir())) == len(list((out / "masks").iterdir())) == n
    assert not list(out.rglob(".*.tmp"))
    # Pair i is a pure function of (seed, i): the resumed set equals the uninterrupted one, byte for byte.
    ref_records, ref_images, ref_masks = read_pairs(tmp_path / "straight")
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(masks, ref_masks)
    assert records == ref_records
    filtered = [json.loads(line) for line in (out / "filtered" / "manifest.jsonl").read_text().splitlines()]
    assert len(filtered) == n - round(0.1 * n)

    # Holes inside a batch (a lost image, a lost mask) are refilled from their whole batch, so the refilled
    # pairs equal the straight run's too (a batch of one rounds differently from a batch of two).
    holes = tmp_path / "holes"
    shutil.copytree(tmp_path / "straight", holes)
    (holes / "images" / f"{ref_records[5]['name']}.png").unlink()
    (holes / "masks" / f"{ref_records[8]['name']}.png").unlink()
    refilled = run_script("generate_dataset.py", overrides + [f"generate.out_dir={holes}"])
    assert refilled.returncode == 0, refilled.stderr
    assert "(2 new)" in refilled.stdout, refilled.stdout
    records, images, masks = read_pairs(holes)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(masks, ref_masks)
    assert records == ref_records


def test_generation_continued_to_a_larger_n_keeps_the_first_pairs_and_lists_all(stack, tmp_path):
    """generate.num_images raised on a finished folder: the first N pairs stay as they are (the same files,
    not rewritten), only the new ones are made, and the manifest and filtered/ cover all of them."""
    out = tmp_path / "gen"
    overrides = stack["overrides"] + ["generate.batch_size=2", "generate.steps=2", f"generate.out_dir={out}"]
    first = run_script("generate_dataset.py", overrides + ["generate.num_images=3"])
    assert first.returncode == 0, first.stderr
    old_records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    old_files = {p: (p.read_bytes(), p.stat().st_ino) for sub in ("images", "masks", "previews")
                 for p in sorted((out / sub).iterdir())}
    assert len(old_records) == 3 and len(old_files) == 9

    more = run_script("generate_dataset.py", overrides + ["generate.num_images=6"])
    assert more.returncode == 0, more.stderr
    assert "6 pairs" in more.stdout and "(3 new)" in more.stdout, more.stdout
    for path, (data, inode) in old_files.items():  # byte-identical, and never rewritten (atomic writes renew inodes)
        assert path.read_bytes() == data and path.stat().st_ino == inode, path
    records, images, masks = read_pairs(out)
    assert [r["id"] for r in records] == list(range(6)) and records[:3] == old_records
    assert len(list((out / "images").iterdir())) == len(list((out / "masks").iterdir())) == 6
    assert len({image.tobytes() for image in images}) == 6  # the new pairs are new samples, not repeats
    filtered = [json.loads(line) for line in (out / "filtered" / "manifest.jsonl").read_text().splitlines()]
    assert len(filtered) == 6 - round(0.1 * 6) and {r["id"] for r in filtered} <= set(range(6))


def _fake_pairs(out: Path, uncertainties: np.ndarray) -> None:
    """A generated folder as write_filtered_view reads it: manifest records and (empty) pair files."""
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True)
        for i in range(len(uncertainties)):
            (out / sub / f"{pair_name(i)}.png").touch()
    (out / "manifest.jsonl").write_text("".join(json.dumps({"id": i, "name": pair_name(i), "uncertainty": float(u)})
                                                + "\n" for i, u in enumerate(uncertainties)))


def _kept_ids(view: Path) -> list[int]:
    return [json.loads(line)["id"] for line in (view / "manifest.jsonl").read_text().splitlines()]


def test_official_filter_keeps_the_official_slice_of_sorted_pairs(tmp_path):
    """Official train_deeplab.py: idxs = argsort(u); idxs[30 : -int(0.1 * N) + 30]; ties here by id."""
    n = 400
    u = np.round(np.random.default_rng(0).random(n), 2)  # 2 decimals: many ties, broken by id
    by_rank = sorted(range(n), key=lambda i: (u[i], i))
    classes = ClassList(list(CLASS_NAMES), PALETTE)
    _fake_pairs(tmp_path / "gen", u)

    view = write_filtered_view(tmp_path / "gen", classes, 0.1, "official")
    assert _kept_ids(view) == sorted(by_rank[30:n - 40 + 30])  # drops the 30 least and 10 most uncertain
    assert sorted(p.stem for p in (view / "images").iterdir()) == [pair_name(i) for i in _kept_ids(view)]
    view = write_filtered_view(tmp_path / "gen", classes, 0.1, "drop_most_uncertain")
    assert _kept_ids(view) == sorted(by_rank[:n - 40])
    assert _kept_ids(write_filtered_view(tmp_path / "gen", classes, 0.0, "official")) == list(range(n))

    # int(0.1 * 300) = 30: the official slice [30:0] would be empty -> refused, naming N and the rule.
    _fake_pairs(tmp_path / "small", u[:300])
    with pytest.raises(UserError, match="official.*N=300"):
        write_filtered_view(tmp_path / "small", classes, 0.1, "official")
    with pytest.raises(ConfigError, match="filter_rule.*N=300"):
        load_config(None, ["generate.filter_rule=official", "generate.num_images=300"])


def test_ensemble_file_for_other_features_names_what_differs(stack, tmp_path):
    spec = build_extractor(stack["cfg"]).spec.to_dict()
    spec["timesteps"] = [10, 20, 30]
    save_ensemble(tmp_path / "ens.pt", PixelEnsemble(stack["dim"], len(CLASS_NAMES), members=2),
                  {"class_names": list(CLASS_NAMES), "palette": PALETTE.tolist(), "feature_spec": spec})
    out = tmp_path / "out"
    proc = run_script("segment.py", stack["overrides"] + [f"ensemble.path={tmp_path / 'ens.pt'}",
                                                         f"segment.out_dir={out}"])
    assert proc.returncode == 2, proc.stderr
    configured = tuple(stack["cfg"].features.timesteps)
    assert "ens.pt was trained on other features" in proc.stderr and f"timesteps: (10, 20, 30) != {configured}" \
        in proc.stderr, proc.stderr
    assert not out.exists()  # refused before anything was written


def test_feature_store_to_ensemble_to_masks_through_the_scripts(stack, tmp_path):
    """extract_features.py -> train_mlps.py -> segment.py, as a user runs them: the store holds the
    labeled images and their mirrors, the ensemble file says so, and segment.py writes a mask per test image."""
    toy = tmp_path / "toy"
    overrides = stack["overrides"] + [
        f"data.root={toy}", f"labels.labeled_dir={toy / 'labeled'}", f"labels.test_dir={toy / 'test'}",
        "labels.labeled_range=[0,4]", "labels.num_labeled=4", "labels.test_range=[0,3]", "labels.min_pixels=0",
        f"features.store_dir={tmp_path / 'store'}", f"ensemble.path={tmp_path / 'ens' / 'ensemble.pt'}",
        "ensemble.readout=pixel_mlp", "ensemble.members=2", "ensemble.min_steps=0", "ensemble.max_epochs=1", f"segment.out_dir={tmp_path / 'seg'}"]
    for script in ("make_toy_faces.py", "extract_features.py", "train_mlps.py", "segment.py"):
        proc = run_script(script, overrides)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    store = json.loads((tmp_path / "store" / "meta.json").read_text())
    assert store["views"] == "flip" and store["rows"] == 2 * 4 * 16 * 16  # 4 images and their mirrors
    _, meta = load_ensemble(tmp_path / "ens" / "ensemble.pt")
    assert meta["train_views"] == "flip" and meta["trained_on"] == store["images"]
    assert len(list((tmp_path / "seg" / "masks").glob("*.png"))) == 3
    assert json.loads((tmp_path / "seg" / "metrics.json").read_text())["miou"] > 0


def _torchrun(script: str, overrides: list[str], nproc: int, wait: bool = True):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"utils/{script}", *[a for s in overrides for a in ("--set", s)]]
    if not wait:
        return subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".lock", "config.yaml")}


def test_two_torchrun_ranks_write_the_same_data_set_as_one_process_and_resume_after_a_rank_dies(stack, tmp_path):
    # 100 sampler steps (~0.4 s a batch here) leave each rank two batches after its first manifest line: the
    # kill below lands mid-job with a wide margin (at 3 steps the job could finish between two polls).
    n = 10
    overrides = stack["overrides"] + [f"generate.num_images={n}", "generate.batch_size=2", "generate.steps=100"]
    one = run_script("generate_dataset.py", overrides + [f"generate.out_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr
    two = _torchrun("generate_dataset.py", overrides + [f"generate.out_dir={tmp_path / 'two'}"], 2)
    assert two.returncode == 0, two.stderr
    assert _files(tmp_path / "two") == _files(tmp_path / "one")  # images, masks, previews, manifests, filtered/
    assert not list((tmp_path / "two").glob("manifest.rank*"))

    # Kill the whole job (every rank, SIGKILL) once both shards have pairs; the next run completes it.
    out = tmp_path / "killed"
    job = _torchrun("generate_dataset.py", overrides + [f"generate.out_dir={out}"], 2, wait=False)
    deadline = time.time() + 120
    shards = [out / "manifest.rank0.jsonl", out / "manifest.rank1.jsonl"]
    while not all(s.is_file() and s.read_text().count("\n") >= 1 for s in shards) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / "filtered").exists(), "the job finished before it could be killed"
    resumed = _torchrun("generate_dataset.py", overrides + [f"generate.out_dir={out}"], 2)
    assert resumed.returncode == 0, resumed.stderr
    assert _files(out) == _files(tmp_path / "one")


def test_segment_under_torchrun_writes_the_same_folder_as_one_process(stack, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(render_faces(range(7), 16, seed=2)[0]):
        Image.fromarray(image).save(images / f"face{i}.png")
    overrides = stack["overrides"] + [f"segment.input_dir={images}"]
    one = run_script("segment.py", overrides + [f"segment.out_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr
    two = _torchrun("segment.py", overrides + [f"segment.out_dir={tmp_path / 'two'}"], 2)
    assert two.returncode == 0, two.stderr
    written = _files(tmp_path / "two")
    assert written == _files(tmp_path / "one")
    assert len([k for k in written if k.startswith("masks/")]) == 7 and "uncertainty.csv" in written


def test_feature_store_under_torchrun_is_the_one_process_store(stack, tmp_path):
    toy = tmp_path / "toy"
    overrides = stack["overrides"] + [f"data.root={toy}", f"labels.labeled_dir={toy / 'labeled'}",
                                      "labels.labeled_range=[0,5]", "labels.num_labeled=5", "labels.min_pixels=0"]
    assert run_script("make_toy_faces.py", overrides).returncode == 0
    one = run_script("extract_features.py", overrides + [f"features.store_dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr
    two = _torchrun("extract_features.py", overrides + [f"features.store_dir={tmp_path / 'two'}"], 2)
    assert two.returncode == 0, two.stderr
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["rows"] == 2 * 5 * 16 * 16
    assert not list(tmp_path.glob("two.partial*"))


def test_official_filter_range_truncates_the_drop_count_as_the_official_script():
    # The official slice idxs[30 : -int(N * 0.1) + 30]: int() truncates, also where N * 0.1 ends in .5 or more.
    assert official_filter_range(315, 0.1) == (30, 315 - 31 + 30)  # 31.5 -> 31, not 32
    assert official_filter_range(339, 0.1) == (30, 339 - 33 + 30)  # 33.9 -> 33
    assert official_filter_range(1000, 0.1) == (30, 930)
