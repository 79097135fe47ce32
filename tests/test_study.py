"""The baseline study on a tiny DDPM: every kind on the same labeled draws, the supervised row equal
to train_segmenter.py's network trained by hand on that draw, and k-center draws instead of random ones."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffuseseg.config import load_config
from diffuseseg.datasets import labeled_split, unlabeled_images
from diffuseseg.metrics import evaluate
from diffuseseg.segmentation import (build_extractor, class_probabilities, configured_views, fit_readout,
                                    image_member_scores, probabilities_of, streamed_probabilities, view_features)
from diffuseseg.segmenter import predict_logits, predict_masks, train_from_config
from diffuseseg.errors import UserError
from diffuseseg.recipe_study import run_recipe_study
from diffuseseg.self_training import UNLABELED_KEYS
from diffuseseg.study import (StudyResult, _cells_to_keep, check_resumable, merge_studies, read_study, run_study,
                              save_study)
from diffuseseg.training import train_ddpm
from conftest import REPO, run_script, toy_split_overrides


def _study_overrides(stack, tmp_path) -> list[str]:
    """Toy faces rendered into tmp_path (8 labeled, 4 val) and read-outs small enough for seconds."""
    return stack["overrides"] + toy_split_overrides(tmp_path / "toy", 8, 4, "val", 4) + [
        "labels.min_pixels=0", "ensemble.readout=pixel_mlp", "ensemble.members=2", "ensemble.min_steps=0", "ensemble.max_epochs=1",
        "segmenter.steps=6", "segmenter.batch_size=2"]


def test_every_kind_sees_the_same_draws_and_supervision_is_train_segmenter_on_them(stack, tmp_path):
    cfg = load_config(REPO / "config.yaml", _study_overrides(stack, tmp_path))
    result = run_study(cfg, ["ddpm", "raw_rgb_xy", "supervised"], [2, 3], draws=2, split="val", progress=False)
    assert set(result.miou) == {"ddpm", "raw_rgb_xy", "supervised"}
    assert all(len(result.miou[k][n]) == 2 and all(0 <= v <= 1 for v in result.miou[k][n])
               for k in result.miou for n in (2, 3))
    table = result.markdown()
    assert "plain supervision" in table and "3 labeled" in table and "drawn by `random`" in table
    # The supervised row of (n=3, draw 1), rebuilt by hand from the study's documented draw.
    pool, val = labeled_split(cfg, "labeled"), labeled_split(cfg, "val")
    _, images, masks = pool.load()
    _, val_images, val_masks = val.load()
    chosen = np.sort(np.random.default_rng([cfg.run.seed, 3, 1]).choice(len(pool), 3, replace=False))
    net = train_from_config(images[chosen], masks[chosen], pool.classes.names,
                            replace(cfg.segmenter, seed=cfg.segmenter.seed + 1), progress=False)
    # At the study's prediction batch size (cfg.segmenter.batch_size): another batch size runs other convolution
    # shapes, whose float bits (and so an argmax) may differ on some CPUs, and the comparison below is exact.
    masks_by_hand = predict_masks(net, val_images, batch_size=cfg.segmenter.batch_size)
    expected = evaluate(list(masks_by_hand), list(val_masks), pool.classes.names).miou
    assert result.miou["supervised"][3][1] == expected
    assert json.loads(result.to_json())["miou"]["supervised"]["3"][1] == expected
    # Per-class IoU, averaged over the draws: its mean over the classes is the mean mIoU (no class is excluded).
    per_class = json.loads(result.to_json())["per_class_iou"]
    for kind in result.miou:
        assert list(per_class[kind]["2"]) == pool.classes.names
        assert np.mean(list(per_class[kind]["2"].values())) == pytest.approx(np.mean(result.miou[kind][2]), abs=1e-9)


class _Stop(Exception):
    pass


def test_a_stopped_study_resumes_where_it_stopped(stack, tmp_path, one_thread):
    """A run stopped after its first (kind, size) cell leaves a study that --resume completes, computing only
    the missing cells; the result equals an uninterrupted run (same process, threads and seeds)."""
    overrides = _study_overrides(stack, tmp_path)
    cfg = load_config(REPO / "config.yaml", overrides)
    whole = run_study(cfg, ["raw_rgb_xy", "supervised"], [2, 3], draws=1, split="val", progress=False)
    saved = []

    def stop_after_first(partial):
        saved.append(StudyResult.from_json(partial.to_json()))
        raise _Stop

    with pytest.raises(_Stop):
        run_study(cfg, ["raw_rgb_xy", "supervised"], [2, 3], draws=1, split="val", progress=False,
                  on_cell=stop_after_first)
    assert saved[0].miou == {"raw_rgb_xy": {2: whole.miou["raw_rgb_xy"][2]}, "supervised": {}}
    assert "| — |" in saved[0].markdown()  # the cells still to run
    cells = []
    resumed = run_study(cfg, ["raw_rgb_xy", "supervised"], [2, 3], draws=1, split="val", progress=False,
                        done=saved[0], on_cell=lambda r: cells.append(sum(map(len, r.miou.values()))))
    assert cells == [2, 3, 4]  # three cells computed, the first kept
    assert resumed.miou == whole.miou and resumed.per_class_iou == whole.per_class_iou

    # A derived kind needs its sources' predictions on the same draw: their cells rerun while it is missing.
    partial = StudyResult("val", 4, [2], 1, miou={"ddpm": {2: [0.5]}, "supervised": {2: [0.4]}},
                          per_class_iou={"ddpm": {2: {}}, "supervised": {2: {}}})
    assert _cells_to_keep(partial, ["ddpm", "supervised", "fused"], [2], ()) == set()
    assert _cells_to_keep(partial, ["ddpm", "supervised"], [2], ()) == {("ddpm", 2), ("supervised", 2)}

    # Resuming is only for the same study: another config key names itself; threads and the RAM limit may differ.
    faster = load_config(REPO / "config.yaml", overrides + ["run.threads=2", "features.ram_limit_mb=0"])
    check_resumable(saved[0], faster, cfg, "val", 1, "random", "there")
    with pytest.raises(UserError, match=r"segmenter.steps: 6 != 7.*another --out"):
        check_resumable(saved[0], load_config(REPO / "config.yaml", overrides + ["segmenter.steps=7"]), cfg, "val",
                        1, "random", "there")
    with pytest.raises(UserError, match="draws: 1 there, 2 now"):
        check_resumable(saved[0], cfg, cfg, "val", 2, "random", "there")


def test_kcenter_draws_through_the_script(stack, tmp_path):
    overrides = _study_overrides(stack, tmp_path) + [
        "ensemble.readout=conv_head", "conv_head.members=2", "conv_head.hidden=8", "conv_head.steps=3"]
    out = tmp_path / "study"
    proc = run_script("evaluate_baselines.py", overrides, "--kinds", "ddpm", "--labeled", "2", "--draws", "2",
                      "--split", "val", "--select", "kcenter", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    study = json.loads((out / "study.json").read_text())
    assert study["selection"] == "kcenter" and study["readout"] == "conv_head" and len(study["miou"]["ddpm"]["2"]) == 2


def test_evaluate_baselines_script_reports_every_kind_and_size(stack, tmp_path, one_thread):
    """One tiny real run of the script: study.json holds one mIoU in [0, 1] per kind, size and draw, on the
    asked split, equal to the library's run_study on the same config; study.md is the same numbers as a table."""
    overrides = _study_overrides(stack, tmp_path)
    out = tmp_path / "baselines"
    proc = run_script("evaluate_baselines.py", overrides, "--kinds", "ddpm", "raw_rgb_xy", "--labeled", "2", "3",
                      "--draws", "1", "--split", "val", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    study = json.loads((out / "study.json").read_text())
    assert (study["split"], study["num_eval_images"], study["labeled_sizes"], study["draws"]) == ("val", 4, [2, 3], 1)
    again = run_script("evaluate_baselines.py", overrides, "--kinds", "ddpm", "raw_rgb_xy", "--labeled", "2", "3",
                       "--draws", "1", "--split", "val", "--out", str(out), "--resume")
    assert again.returncode == 0 and "4 (kind, size) cells done" in again.stdout, again.stderr  # nothing to rerun
    assert json.loads((out / "study.json").read_text())["miou"] == study["miou"]
    assert list(study["miou"]) == ["ddpm", "raw_rgb_xy"]
    values = {k: {n: v for n, v in d.items()} for k, d in study["miou"].items()}
    assert all(list(d) == ["2", "3"] and all(len(v) == 1 and 0 <= v[0] <= 1 for v in d.values())
               for d in values.values()), values
    table = (out / "study.md").read_text().splitlines()
    assert table[:2] == ["| method | 2 labeled | 3 labeled |", "|---|---|---|"]
    assert table[2:4] == [f"| {label} | {values[k]['2'][0]:.3f} | {values[k]['3'][0]:.3f} |"  # one draw: no ± 0
                          for k, label in (("ddpm", "trained DDPM features"), ("raw_rgb_xy", "raw RGB + (x, y)"))]
    assert "on 4 val images" in table[5] and table[2] in proc.stdout
    at = table.index("Per-class IoU with 3 labeled images (mean over the draws):")
    assert table[at + 2] == "| class | ddpm | raw_rgb_xy |" and table[at + 4].startswith("| background | ")
    costs = at + 4 + len(study["per_class_iou"]["ddpm"]["3"]) + 1  # then what each cell cost
    assert table[costs].startswith("What each cell cost") and len(table) == costs + 4 + 4  # 2 kinds x 2 sizes
    assert table[costs + 4].startswith("| ddpm | 2 | ") and table[costs + 4].endswith(" | RAM | "
                                                                                       f"{study['costs']['ddpm']['2']['features_s']:.0f} |")
    assert load_config(out / "config.yaml").labels.num_labeled == 4
    cfg = load_config(REPO / "config.yaml", overrides)
    again = run_study(cfg, ["ddpm"], [3, 5], draws=2, split="val", progress=False)
    assert again.miou["ddpm"][3][0] == values["ddpm"]["3"][0]

    # --merge: rows of studies run apart in one table; sizes are the union, a missing cell is a dash.
    save_study(again, tmp_path / "apart")
    merged_dir = tmp_path / "merged"
    proc = run_script("evaluate_baselines.py", [], "--merge", str(out), f"two draws={tmp_path / 'apart'}",
                      "--out", str(merged_dir))
    assert proc.returncode == 0, proc.stderr
    merged = (merged_dir / "study.md").read_text().splitlines()
    mean, std = np.mean(again.miou["ddpm"][5]), np.std(again.miou["ddpm"][5])
    assert merged[:5] == ["| method | 2 labeled | 3 labeled | 5 labeled |", "|---|---|---|---|",
                          table[2][:-1] + "| — |", table[3][:-1] + "| — |",
                          f"| trained DDPM features [two draws] | — | {again.summary('ddpm', 3)[0]:.3f} ± "
                          f"{again.summary('ddpm', 3)[1]:.3f} | {mean:.3f} ± {std:.3f} |"]
    per_class = next(line for line in merged if line.startswith("Per-class IoU with"))
    assert per_class.startswith("Per-class IoU with 3 labeled images")  # the size all three rows have
    assert json.loads((merged_dir / "study.json").read_text())["miou"]["ddpm [two draws]"]["5"] == again.miou["ddpm"][5]
    clash = run_script("evaluate_baselines.py", [], "--merge", str(out), str(out), "--out", str(tmp_path / "clash"))
    assert clash.returncode != 0 and "'ddpm' has [2, 3] labeled from two studies" in clash.stderr
    five = replace(again, labeled_sizes=[5], miou={"ddpm": {5: again.miou["ddpm"][5]}},
                   per_class_iou={"ddpm": {5: again.per_class_iou["ddpm"][5]}})
    joined = merge_studies([("", five), read_study(str(out))])  # one row's sizes run apart join
    assert joined.miou["ddpm"] == {2: values["ddpm"]["2"], 3: values["ddpm"]["3"], 5: again.miou["ddpm"][5]}
    assert joined.labeled_sizes == [2, 3, 5] and list(joined.miou) == ["ddpm", "raw_rgb_xy"]
    missing = run_script("evaluate_baselines.py", [], "--merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2"))
    assert missing.returncode != 0 and "nowhere/study.json: no study here" in missing.stderr


def test_recipe_study_trains_scores_and_plots_each_recipe(stack, tmp_path):
    overrides = _study_overrides(stack, tmp_path) + [
        "ensemble.readout=conv_head", "conv_head.members=1", "conv_head.hidden=8", "conv_head.steps=3"]
    out = tmp_path / "recipes"
    results = run_recipe_study(str(REPO / "config.yaml"), overrides, ["today", "constant_lr"], out,
                                     budget_min=0.02, snapshot_min=0.01, labeled=2, draws=2, num_samples=8,
                                     sample_steps=2, log=lambda *_: None)
    assert [r.name for r in results] == ["today", "constant_lr"]
    for r in results:
        assert [s.minute for s in r.snapshots] == [0.01, 0.02]
        assert all(len(s.val_miou) == 2 and 0 <= s.two_sample_accuracy <= 1 and s.feature_distance > 0
                   for s in r.snapshots)
        assert r.images_per_s > 0 and r.gflop_per_image > 0 and r.peak_gflops > 0
        assert (out / r.name / "gemm_peak.json").is_file()
        assert load_config(out / r.name / "config.yaml").train.time_budget_min == 0.02
    assert load_config(out / "constant_lr" / "config.yaml").train.lr_schedule == "constant"
    saved = json.loads((out / "recipes.json").read_text())
    assert [r["name"] for r in saved["recipes"]] == ["today", "constant_lr"]
    assert "| constant_lr | `train.lr_schedule=constant` |" in (out / "recipes.md").read_text()
    assert (out / "quality_vs_minutes.png").stat().st_size > 1000
    # Rerunning resumes: the finished trainings are kept, not repeated, and the scored figures are reused.
    assert len(list((out / "today" / "snapshots").glob("*.scores.json"))) == 2
    steps = [r.snapshots[-1].step for r in results]
    again = run_recipe_study(str(REPO / "config.yaml"), overrides, ["today"], out, budget_min=0.02,
                                snapshot_min=0.01, labeled=2, draws=1, num_samples=8, sample_steps=2,
                                log=lambda *_: None)
    assert again[0].snapshots[-1].step == steps[0]
    assert again[0].snapshots[-1].feature_distance == pytest.approx(results[0].snapshots[-1].feature_distance,
                                                                    rel=1e-6)  # same cached samples
    with pytest.raises(UserError, match="unknown recipe 'fast' of study 'toy'"):
        run_recipe_study(str(REPO / "config.yaml"), overrides, ["fast"], out, budget_min=0.02, snapshot_min=0.01)
    with pytest.raises(UserError, match="unknown study 'huge'; known: toy, celebahq64"):
        run_recipe_study(str(REPO / "config.yaml"), overrides, ["today"], out, budget_min=0.02, snapshot_min=0.01,
                         study="huge")


def test_a_step_budget_scores_the_end_of_each_recipe_with_the_face_judge(stack, tmp_path):
    """--budget-steps: every recipe trains the same steps whatever shares the CPU, the end is its one snapshot,
    and with sample.judge its samples get the judge's figures beside the critic's."""
    judge = REPO / "checkpoints" / "face_judge_64" / "segmenter.pt"
    overrides = _study_overrides(stack, tmp_path) + [
        "ensemble.readout=conv_head", "conv_head.members=1", "conv_head.hidden=8", "conv_head.steps=3",
        f"sample.judge={judge}"]
    out = tmp_path / "recipes"
    results = run_recipe_study(str(REPO / "config.yaml"), overrides, ["today", "min_snr"], out, budget_min=0,
                               snapshot_min=0, budget_steps=3, labeled=2, draws=1, num_samples=8, sample_steps=2,
                               log=lambda *_: None)
    for r in results:
        assert len(r.snapshots) == 1 and r.snapshots[0].step == 3
        assert r.snapshots[0].parser_distance > 0 and 0 <= r.snapshots[0].parts_in_place <= 1
        cfg = load_config(out / r.name / "config.yaml")
        assert (cfg.train.max_steps, cfg.train.time_budget_min) == (3, 0)
    table = (out / "recipes.md").read_text()
    assert "| parser distance | parts in place |" in table and "| min_snr |" in table
    assert json.loads((out / "recipes.json").read_text())["budget_steps"] == 3


def test_score_snapshots_script_draws_one_runs_quality_against_minutes(stack, tmp_path, one_thread):
    """utils/score_snapshots.py on a run's snapshots: val mIoU and sample figures per snapshot, kept beside it."""
    overrides = _study_overrides(stack, tmp_path) + [
        "ensemble.readout=conv_head", "conv_head.members=1", "conv_head.hidden=8", "conv_head.steps=3",
        f"labels.test_dir={tmp_path / 'toy' / 'test'}", "data.test_indices=[1000200,1000206]", "labels.test_range=[0,6]"]
    run = tmp_path / "run"
    cfg = load_config(REPO / "config.yaml", overrides + [f"train.out_dir={run}", "train.max_steps=100000",
                                                         "train.time_budget_min=0.02", "train.snapshot_every_min=0.01"])
    train_ddpm(cfg, progress=False)
    args = ("--run", str(run), "--labeled", "2", "--samples", "6", "--sample-steps", "2", "--out", str(tmp_path / "curve"))
    proc = run_script("score_snapshots.py", overrides, *args)
    assert proc.returncode == 0, proc.stderr
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert [s["minute"] for s in curve["snapshots"]] == [0.01, 0.02] and curve["samples"] == 6
    assert all(len(s["val_miou"]) == 1 and 0 <= s["val_miou"][0] <= 1 and s["feature_distance"] > 0
               for s in curve["snapshots"])
    assert "| 0.02 |" in (tmp_path / "curve" / "curve.md").read_text()
    assert (tmp_path / "curve" / "quality_vs_minutes.png").stat().st_size > 1000
    kept = sorted(p.name for p in (run / "snapshots").iterdir() if p.suffix != ".pt")
    assert len(kept) == 4  # per snapshot: its scores and its samples
    proc = run_script("score_snapshots.py", overrides, *args[:-1], str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    again = json.loads((tmp_path / "again" / "curve.json").read_text())["snapshots"]
    assert [s["val_miou"] for s in again] == [s["val_miou"] for s in curve["snapshots"]]  # kept, not rescored
    assert [s["feature_distance"] for s in again] == pytest.approx([s["feature_distance"] for s in curve["snapshots"]],
                                                                  rel=1e-6)  # the kept samples
    proc = run_script("score_snapshots.py", overrides, "--run", str(tmp_path), "--samples", "6")
    assert proc.returncode != 0 and "snapshots not found" in proc.stderr


def _one_draw_by_hand(cfg, n: int, predict_on: str = "val"):
    """The study's first draw of ``n`` labels, rebuilt from its documented recipe: the labeled images and
    masks, and the DDPM read-out's and the supervised U-Net's class probabilities on the images of
    ``predict_on`` ('val', or 'unlabeled': the first student.unlabeled training images)."""
    pool = labeled_split(cfg, "labeled")
    _, images, masks = pool.load()
    targets = labeled_split(cfg, "val").load()[1] if predict_on == "val" else unlabeled_images(cfg, cfg.student.unlabeled)
    keys = range(len(targets)) if predict_on == "val" else range(UNLABELED_KEYS, UNLABELED_KEYS + len(targets))
    chosen = np.sort(np.random.default_rng([cfg.run.seed, n, 0]).choice(len(pool), n, replace=False))
    net = train_from_config(images[chosen], masks[chosen], pool.classes.names, cfg.segmenter, progress=False)
    supervised = predict_logits(net, targets, batch_size=cfg.segmenter.batch_size).softmax(1).permute(0, 2, 3, 1)
    extractor = build_extractor(cfg, "ddpm")
    fit_views, eval_views = (configured_views(cfg, pool.classes.names, use) for use in ("train", "test"))
    # The study's feature batch size: another batch size runs other convolution shapes, whose float bits may
    # differ on some CPUs, and the exact comparisons below need both sides computed the same way.
    bs = cfg.features.batch_size
    pool_feats = view_features(extractor, images, fit_views, range(len(images)), bs)
    heads, _ = fit_readout(cfg, [f[chosen] for f in pool_feats], masks[chosen], fit_views, pool.classes,
                           extractor.spec, "cpu", progress=False, seed=cfg.ensemble.seed)
    if predict_on == "val":
        ddpm = class_probabilities(heads, view_features(extractor, targets, eval_views, keys, bs), eval_views,
                                   out_size=targets.shape[1])
    else:  # the study reads unlabeled images off the U-Net's blocks, storing no features (streamed_probabilities)
        scores = image_member_scores(extractor, heads, targets, eval_views, keys, bs)
        ddpm = probabilities_of(scores, len(targets), extractor.label_size, out_size=targets.shape[1])
    return pool, images[chosen], masks[chosen], ddpm, supervised


def _conv_head_cfg(stack, tmp_path, *extra: str):
    return load_config(REPO / "config.yaml", _study_overrides(stack, tmp_path) + [
        "ensemble.readout=conv_head", "conv_head.members=2", "conv_head.hidden=8", "conv_head.steps=3", *extra])


def test_fused_row_is_the_argmax_of_the_two_rows_averaged_probabilities(stack, tmp_path):
    """Rebuild the fused masks of one draw by hand: the DDPM read-out's and the supervised U-Net's
    class probabilities, averaged per pixel."""
    cfg = _conv_head_cfg(stack, tmp_path)
    with pytest.raises(ValueError, match="fused"):
        run_study(cfg, ["ddpm", "fused"], [3], draws=1, split="val", progress=False)
    result = run_study(cfg, ["fused", "supervised", "ddpm"], [3], draws=1, split="val", progress=False)
    assert list(result.miou) == ["supervised", "ddpm", "fused"]

    pool, _, _, ddpm, supervised = _one_draw_by_hand(cfg, 3)
    val_masks = labeled_split(cfg, "val").load()[2]
    fused = ((ddpm + supervised) / 2).argmax(-1).to(torch.uint8).numpy()
    expected = evaluate(list(fused), list(val_masks), pool.classes.names).miou
    assert result.miou["fused"][3][0] == pytest.approx(expected, abs=1e-12)
    assert ddpm.shape == supervised.shape and torch.allclose(ddpm.sum(-1), torch.ones(ddpm.shape[:3]), atol=1e-5)


def test_student_row_is_a_segmenter_taught_by_the_fused_teacher_on_unlabeled_images(stack, tmp_path):
    """Rebuild one draw's student by hand: the fused teacher's probabilities on the unlabeled images,
    its confident pixels as masks, the real pairs repeated beside them, the segmenter trained on that."""
    cfg = _conv_head_cfg(stack, tmp_path, "student.teacher=fused", "student.unlabeled=6", "student.steps=20",
                         "student.confidence=0.1", "student.real_fraction=0.5", "student.base_channels=8",
                         "student.rounds=1")
    with pytest.raises(ValueError, match="student.teacher"):
        run_study(cfg, ["ddpm", "student"], [3], draws=1, split="val", progress=False)
    result = run_study(cfg, ["student", "fused", "ddpm", "supervised"], [3], draws=1, split="val", progress=False)
    assert list(result.miou) == ["ddpm", "supervised", "fused", "student"]

    pool, images, masks, ddpm, supervised = _one_draw_by_hand(cfg, 3, predict_on="unlabeled")
    unlabeled = unlabeled_images(cfg, 6)
    teacher = (ddpm.half().float() + supervised.half().float()) / 2  # kept in half precision by the study
    top, label = teacher.max(-1)
    pseudo = np.where(top.numpy() >= 0.1, label.numpy(), cfg.labels.ignore_index).astype(np.uint8)
    # real_fraction 0.5 with 6 pseudo-labeled images: the 3 real pairs twice.
    x = np.concatenate([images, images, unlabeled])
    y = np.concatenate([masks, masks, pseudo])
    net = train_from_config(x, y, pool.classes.names, replace(cfg.segmenter, steps=20, base_channels=8),
                            progress=False)
    _, val_images, val_masks = labeled_split(cfg, "val").load()
    expected = evaluate(list(predict_masks(net, val_images, batch_size=cfg.segmenter.batch_size)), list(val_masks), pool.classes.names).miou
    assert result.miou["student"][3][0] == pytest.approx(expected, abs=1e-12)
    # the pool's and val's features memory-mapped from disk (the unlabeled faces' are never stored): same student
    on_disk = run_study(replace(cfg, features=replace(cfg.features, store_dir=str(tmp_path / "store"))),
                        ["student", "fused", "ddpm", "supervised"], [3], draws=1, split="val", progress=False,
                        ram_limit_mb=0)
    assert on_disk.miou == result.miou and not list((tmp_path / "store").iterdir())


def test_streamed_probabilities_are_each_readouts_probabilities_on_the_features_of_all_images(stack, tmp_path):
    """The student's thousands of unlabeled faces are read out a few images at a time, each chunk's features
    extracted once for every draw's read-out and then dropped: the same probabilities, read-out by read-out."""
    cfg = _conv_head_cfg(stack, tmp_path)
    pool = labeled_split(cfg, "labeled")
    _, images, masks = pool.load()
    extractor = build_extractor(cfg, "ddpm")
    fit_views, eval_views = (configured_views(cfg, pool.classes.names, use) for use in ("train", "test"))
    features = view_features(extractor, images[:3], fit_views, range(3), 2)
    readouts = {(3, draw): fit_readout(cfg, features, masks[:3], fit_views, pool.classes, extractor.spec, "cpu",
                                       progress=False, seed=draw)[0] for draw in (0, 1)}
    targets, keys = images[3:8], range(100, 105)
    streamed = streamed_probabilities(extractor, targets, eval_views, readouts, keys, batch_size=2, chunk=2)
    whole = view_features(extractor, targets, eval_views, keys, 2)
    assert set(streamed) == set(readouts)
    for key, readout in readouts.items():
        expected = class_probabilities(readout, whole, eval_views, out_size=targets.shape[1])
        assert streamed[key].dtype == torch.float16 and streamed[key].shape == expected.shape
        torch.testing.assert_close(streamed[key].float(), expected, atol=2e-3, rtol=0)
    assert not torch.allclose(streamed[3, 0].float(), streamed[3, 1].float(), atol=1e-2)  # two read-outs, kept apart


def test_feature_rows_gather_images_of_several_arrays_in_the_asked_order(tmp_path):
    from diffuseseg.conv_head import FeatureRows, channel_statistics
    a = np.arange(3 * 2 * 2 * 2, dtype=np.float16).reshape(3, 2, 2, 2)
    b = -np.arange(2 * 2 * 2 * 2, dtype=np.float16).reshape(2, 2, 2, 2)
    rows = FeatureRows([a, b], rows=[4, 0, 3])  # positions in a then b
    assert rows.shape == (3, 2, 2, 2) and len(rows) == 3
    assert np.array_equal(rows[np.array([2, 0])], np.stack([b[0], b[1]]))
    assert np.array_equal(np.asarray(rows), np.stack([b[1], a[0], b[0]]))
    both = np.concatenate([a, b]).astype(np.float64)
    mean, std = channel_statistics(FeatureRows([a, b]), chunk=2)  # two images at a time
    assert np.allclose(mean, both.reshape(-1, 2).mean(0)) and np.allclose(std, both.reshape(-1, 2).std(0, ddof=1))
    with pytest.raises(IndexError):
        FeatureRows([a], rows=[3])
    # a conv-head fit's 32 px windows: read as slices of the picked images, nothing else of them
    big = np.arange(4 * 6 * 6 * 2, dtype=np.float16).reshape(4, 6, 6, 2)
    rows = FeatureRows([big[:1], big[1:]], rows=[3, 1, 0])
    windows = rows.windows([2, 0], np.array([[1, 2], [3, 0]]), 3)
    assert np.array_equal(windows, np.stack([big[0, 1:4, 2:5], big[3, 3:6, 0:3]]))
    # maps in array files (the study's past features.ram_limit_mb) read each window's rows from the file
    path = tmp_path / "maps.npy"
    on_disk = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=big.shape)
    on_disk[:] = big
    on_disk.flush()
    rows = FeatureRows([np.load(path, mmap_mode="r")], rows=[2, 0, 3])
    windows = rows.windows([0, 2, 1], np.array([[3, 1], [0, 3], [2, 2]]), 3)
    assert np.array_equal(windows, np.stack([big[2, 3:6, 1:4], big[3, 0:3, 3:6], big[0, 2:5, 2:5]]))
    # the study's shape: a FeatureRows per view (picked rows of each view's maps), joined by another
    views = FeatureRows([FeatureRows([big], rows=[3, 1]), FeatureRows([-big], rows=[0])])
    windows = views.windows([2, 0, 1], np.array([[0, 0], [1, 2], [3, 3]]), 3)
    assert np.array_equal(windows, np.stack([-big[0, 0:3, 0:3], big[3, 1:4, 2:5], big[1, 3:6, 3:6]]))


def test_scores_at_256_px_are_the_upsampled_probabilities_against_full_size_masks():
    """2 x 2 probabilities upsampled to 4 x 4 by hand: class 1 where the bilinear weights put it above 1/2."""
    from diffuseseg.segmentation import upsampled_masks
    probs = torch.zeros(1, 2, 2, 2)
    probs[..., 0], probs[0, 0, 0] = 1.0, torch.tensor([0.0, 1.0])  # class 1 only in the top-left pixel
    masks = upsampled_masks(probs, 4)
    # per axis the output centres read the input at -0.25, 0.25, 0.75, 1.25 (clamped): weights 1, .75, .25, 0
    expected = np.zeros((4, 4), np.uint8)
    expected[:2, :2] = 1
    assert np.array_equal(masks[0], expected)
    truth = np.zeros((4, 4), np.uint8)
    truth[0, :2], truth[1, 0], truth[2, 2] = 1, 1, 1
    # class 1: 3 pixels in common, 5 in the union; class 0: 11 in common, 13 in the union
    assert evaluate([masks[0]], [truth], ["background", "face"]).miou == pytest.approx((3 / 5 + 11 / 13) / 2)


def test_study_on_disk_features_scores_at_a_larger_size_and_records_its_costs(stack, tmp_path):
    """A pool above the RAM limit is memory-mapped and gives the same read-out as in RAM; --score-size scores
    the same predictions against masks read at that size; the files go when the kind is done."""
    cfg = load_config(REPO / "config.yaml", _study_overrides(stack, tmp_path) + [
        "ensemble.readout=conv_head", "conv_head.members=1", "conv_head.hidden=8", "conv_head.steps=4",
        f"features.store_dir={tmp_path / 'store'}"])
    on_disk = run_study(cfg, ["ddpm", "supervised"], [2], draws=1, split="val", progress=False,
                        score_size=2 * cfg.model.im_size, ram_limit_mb=0)
    in_ram = run_study(cfg, ["ddpm"], [2], draws=1, split="val", progress=False)
    assert on_disk.miou["ddpm"] == in_ram.miou["ddpm"]
    cost = on_disk.costs["ddpm"][2]
    assert cost["on_disk"] and cost["pool_features_mb"] > 0 and cost["fit_s"] > 0 and cost["peak_rss_mb"] > 0
    assert 0 < cost["peak_private_mb"] <= cost["peak_rss_mb"]
    assert not in_ram.costs["ddpm"][2]["on_disk"] and not list((tmp_path / "store").iterdir())
    side = 2 * cfg.model.im_size
    fine = on_disk.miou_at[side]
    assert set(fine) == {"ddpm", "supervised"} and all(0 <= fine[k][2][0] <= 1 for k in fine)
    assert set(on_disk.per_class_iou_at[side]["ddpm"][2]) == set(on_disk.per_class_iou["ddpm"][2])
    assert f"scored at {side} px" in on_disk.markdown()
    assert StudyResult.from_json(on_disk.to_json()) == on_disk  # kept through study.json


def test_the_labeled_pool_grows_into_more_folders_but_never_into_val_or_test(stack, tmp_path):
    from diffuseseg.errors import DataError
    overrides = _study_overrides(stack, tmp_path)
    cfg = load_config(REPO / "config.yaml", overrides)
    pool, val = labeled_split(cfg, "labeled"), labeled_split(cfg, "val")
    more = tmp_path / "toy" / "more"
    more.mkdir()
    for sub in ("images", "masks"):  # another labeled folder: the pool's first 3 faces under other names
        (more / sub).mkdir()
        for p in sorted((pool.root / sub).iterdir())[:3]:
            (more / sub / f"x{p.name}").write_bytes(p.read_bytes())
    (more / "classes.json").write_bytes((pool.root / "classes.json").read_bytes())
    grown = labeled_split(load_config(REPO / "config.yaml", overrides + [f"labels.labeled_extra=['{more}[1:3]']"]),
                          "labeled")
    assert len(grown) == len(pool) + 2 and grown.names[len(pool):] == [f"x{n}" for n in pool.names[1:3]]
    with pytest.raises(DataError, match="labels.labeled_extra: 4 pool images are val or test images"):
        labeled_split(load_config(REPO / "config.yaml", overrides + [f"labels.labeled_extra=['{val.root}']"]),
                      "labeled")


def test_the_label_curve_has_a_log_axis_one_line_per_row_and_the_ceiling(tmp_path):
    """--merge --plot: studies run apart (one per size) drawn as one curve; 10 -> 100 and 100 -> 1000 labels
    are the same width on the log axis; the ceiling is the supervised row at its size."""
    from diffuseseg.study import label_curve_chart
    rows = {10: 0.30, 100: 0.40, 1000: 0.50}
    for n, v in rows.items():
        save_study(StudyResult("test", 5, [n], 1, miou={"ddpm": {n: [v + 0.05]}, "supervised": {n: [v]}},
                               per_class_iou={"ddpm": {n: {"a": v}}, "supervised": {n: {"a": v}}}), tmp_path / str(n))
    proc = run_script("evaluate_baselines.py", [], "--merge", *[str(tmp_path / str(n)) for n in rows], "--plot",
                      "--ceiling", "1000", "--out", str(tmp_path / "curve"))
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    chart = np.asarray(Image.open(tmp_path / "curve" / "curve.png").convert("RGB")).astype(int)
    merged = read_study(str(tmp_path / "curve"))[1]
    assert merged.labeled_sizes == [10, 100, 1000]
    # the supervised line's markers (second colour, discs 7 px across: the 2 px line never fills 5 rows)
    from diffuseseg.visualize import LINE_COLOURS
    hit = np.all(np.abs(chart - np.array(LINE_COLOURS[1])) < 8, axis=-1)[:, :560 - 130]
    disc = hit[:-4] & hit[1:-3] & hit[2:-2] & hit[3:-1] & hit[4:]
    columns = np.flatnonzero(disc.any(0))
    centres = [c.mean() for c in np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)]
    assert len(centres) == 3 and abs((centres[1] - centres[0]) - (centres[2] - centres[1])) <= 3, centres  # linear: 1:10
    with pytest.raises(UserError, match="no supervised row at 300 labels"):
        label_curve_chart(merged, ceiling=300)
    # the ceiling from a longer fit merged in under a tag: drawn as the dashed line only, not as a third series
    save_study(StudyResult("test", 5, [1000], 1, miou={"supervised": {1000: [0.6]}},
                           per_class_iou={"supervised": {1000: {"a": 0.6}}}), tmp_path / "long")
    proc = run_script("evaluate_baselines.py", [], "--merge", *[str(tmp_path / str(n)) for n in rows],
                      f"long={tmp_path / 'long'}", "--plot", "--ceiling", "supervised [long]=1000",
                      "--out", str(tmp_path / "curve_long"))
    assert proc.returncode == 0, proc.stderr
    chart = np.asarray(Image.open(tmp_path / "curve_long" / "curve.png").convert("RGB")).astype(int)
    assert not np.all(np.abs(chart - np.array(LINE_COLOURS[2])) < 8, axis=-1).any()
    with pytest.raises(UserError, match=r"no supervised \[long\] row at 300 labels"):
        label_curve_chart(read_study(str(tmp_path / "curve_long"))[1], ceiling=300, ceiling_row="supervised [long]")
