"""The real-face preset (configs/celebamask_hq64.yaml) on the CelebAMask-HQ faces in ../shared/data: its
splits, what the DDPM may train on, and a tiny end-to-end run (skipped where ../shared is absent)."""
import json

import numpy as np
import pytest

from diffuseseg.config import load_config
from diffuseseg.datasets import labeled_split, training_image_files
from diffuseseg.label_formats import builtin_classes
from conftest import REPO, SHARED, TINY, run_script

PRESET = REPO / "configs" / "celebamask_hq64.yaml"
CELEBAMASK = SHARED / "data" / "celebamask_hq_ce"


@pytest.fixture
def in_repo(monkeypatch):
    """The preset's data keys are relative to the repo root, where users run the scripts."""
    if not (CELEBAMASK / "labeled" / "masks").is_dir():
        pytest.skip(f"CelebAMask-HQ faces not found at {CELEBAMASK} (../shared is absent in this checkout)")
    monkeypatch.chdir(REPO)


def test_preset_loads_without_the_data():
    from diffuseseg.unet import UNet, count_parameters
    cfg = load_config(PRESET)
    assert (cfg.model.im_size, cfg.labels.format, cfg.data.source) == (64, "index", "folder")
    assert round(count_parameters(UNet(cfg.model)) / 1e6, 2) == 3.54


def test_tracked_real_face_weights_load_into_the_preset_model():
    """checkpoints/celebahq_64 (the real-face DDPM in training) is the preset's run.checkpoint and its model."""
    import torch
    from diffuseseg.checkpoint import load_unet
    cfg = load_config(PRESET)
    assert cfg.run.checkpoint == "checkpoints/celebahq_64/ema_fp16.pt"
    model = load_unet(REPO / cfg.run.checkpoint, cfg)
    out = model(torch.zeros(1, 3, 64, 64), torch.tensor([10]))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert load_config(REPO / "checkpoints" / "celebahq_64" / "config.yaml").model == cfg.model


def test_the_bundled_ddpm_continues_on_any_machine():
    """checkpoints/celebahq_64 (issue 42's long run at its end): the preset's model, trained on the 4468 faces to
    predict v as the preset does, so a new run starts from it with train.init_weights and the preset as it is."""
    from diffuseseg.checkpoint import load_unet, read_checkpoint
    weights = REPO / "checkpoints" / "celebahq_64" / "ema_fp16.pt"  # resolved against the repo, from any folder
    run = load_config(weights.with_name("config.yaml"))  # the run's resolved config, tracked beside the weights
    cfg = load_config(PRESET, [f"train.init_weights={weights}"])
    assert cfg.diffusion.prediction_type == run.diffusion.prediction_type == "v_prediction"
    assert read_checkpoint(weights)["config"]["diffusion"]["prediction_type"] == "v_prediction"
    import torch
    out = load_unet(cfg.train.init_weights, cfg)(torch.zeros(1, 3, 64, 64), torch.tensor([10]))  # strict load
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert run.model == cfg.model and run.data.extra_roots == cfg.data.extra_roots  # the 4468 faces


def test_the_step_13153_reference_stays_loadable_as_epsilon_weights():
    """checkpoints/celebahq_64_eps13k (the bundled DDPM before issue 42, which the older docs figures used): it
    loads with diffusion.prediction_type=epsilon and the preset's v-prediction is refused by name."""
    import torch
    from diffuseseg.checkpoint import CheckpointError, load_unet
    weights = REPO / "checkpoints" / "celebahq_64_eps13k" / "ema_fp16.pt"
    out = load_unet(weights, load_config(PRESET, ["diffusion.prediction_type=epsilon"]))(
        torch.zeros(1, 3, 64, 64), torch.tensor([10]))
    assert torch.isfinite(out).all()
    with pytest.raises(CheckpointError, match="prediction_type"):
        load_unet(weights, load_config(PRESET))


def test_preset_splits_the_labeled_faces_and_keeps_test_faces_out_of_ddpm_training(in_repo):
    cfg = load_config(PRESET)
    assert cfg.model.im_size == 64 and cfg.labels.classes == "celebamask_hq"
    pool, val, test = (labeled_split(cfg, s) for s in ("labeled", "val", "test"))
    assert (len(pool), len(val), len(test)) == (200, 100, 499)
    assert pool.classes.names == builtin_classes("celebamask_hq").names and len(pool.classes.names) == 19
    ddpm_files = training_image_files(cfg)
    ddpm_faces = {f.stem for f in ddpm_files}
    assert len(ddpm_faces) == len(ddpm_files) == 1257 + 300 + 2911  # + celebamask_hq_extra's images
    assert set(pool.names) | set(val.names) <= ddpm_faces and not ddpm_faces & set(test.names)
    assert sum(f.parent.parent.parent.name == "celebamask_hq_extra" for f in ddpm_files) == 2911
    item = test[0]
    assert item.image.shape == (64, 64, 3) and item.mask.shape == (64, 64) and item.mask.max() <= 18
    assert len(np.unique(item.mask)) >= 5  # a face: skin, hair, eyes, ... survive the resize to 64 px


def test_the_label_curves_pool_grows_into_the_extra_faces_and_never_into_val_or_test(in_repo):
    """Issue 44's pool: the preset's 200 pool faces, then celebamask_hq_extra's 2911 labeled faces."""
    extra = SHARED / "data" / "celebamask_hq_extra" / "labeled"
    if not (extra / "masks").is_dir():
        pytest.skip(f"celebamask_hq_extra not found at {extra}")
    cfg = load_config(PRESET, [f"labels.labeled_extra=['{extra}']"])
    pool, val, test = (labeled_split(cfg, s) for s in ("labeled", "val", "test"))
    assert len(pool) == 200 + 2911 and pool.names[:200] == labeled_split(load_config(PRESET), "labeled").names
    files = {p.image_path.resolve() for p in pool.pairs}
    assert len(files) == len(pool) and not files & {p.image_path.resolve() for p in val.pairs + test.pairs}
    assert not set(pool.names) & (set(val.names) | set(test.names))
    item = pool[200]
    assert item.image.shape == (64, 64, 3) and item.mask.max() <= 18 and len(np.unique(item.mask)) >= 5


def test_the_students_unlabeled_faces_at_scale_are_every_training_face_but_the_pool_and_the_evaluation_split(in_repo):
    """student.unlabeled=0 (issue 44): the 4468 DDPM training faces less the 200 pool and 100 val faces."""
    from diffuseseg.datasets import unlabeled_files
    cfg = load_config(PRESET, ["student.unlabeled=0"])
    pool, val = labeled_split(cfg, "labeled"), labeled_split(cfg, "val")
    files = unlabeled_files(cfg, cfg.student.unlabeled, exclude=pool.names + val.names)
    assert len(files) == 4468 - 300 and not {f.stem for f in files} & set(pool.names + val.names)
    assert unlabeled_files(cfg, 1000, exclude=pool.names + val.names) == files[:1000]  # the preset's first 1000: as before
    assert unlabeled_files(cfg, 1000) == files[:1000]


def _thumbnails(files) -> np.ndarray:
    """16 x 16 grey thumbnails, each standardised: a dot product / 256 is their correlation."""
    from PIL import Image
    rows = []
    for f in files:
        with Image.open(f) as img:
            img.draft("L", (64, 64))  # JPEG decodes at 1/8 size: seconds for thousands of faces
            rows.append(np.asarray(img.convert("L").resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel())
    x = np.stack(rows)
    x -= x.mean(1, keepdims=True)
    return x / (x.std(1, keepdims=True) + 1e-9)


def test_no_extra_training_face_is_a_test_face_by_its_pixels(in_repo):
    """celebamask_hq_extra's faces have other names than the test faces, so the name check above cannot see a
    test face in it: compare thumbnails (shared/data/README.md's own rule: correlation above 0.95 = the same face)."""
    cfg = load_config(PRESET)
    extra = [f for f in training_image_files(cfg) if "celebamask_hq_extra" in f.parts]
    test = labeled_split(cfg, "test")
    test_files = [test.root / "images" / f"{name}.jpg" for name in test.names]
    assert len(extra) == 2911 and all(f.is_file() for f in test_files)
    correlation = _thumbnails(extra) @ _thumbnails(test_files).T / 256
    assert correlation.max() <= 0.95, f"{extra[correlation.max(1).argmax()]} looks like a test face"
    assert correlation.max() > 0.3  # faces against faces: the comparison itself sees faces alike


def test_the_64px_study_varies_the_presets_width_training_data_and_recipe(in_repo):
    """study_recipes.py --study celebahq64: half and 1.5 times the preset's U-Net, its training images with
    CelebA's aligned 10k faces added, and the narrow U-Net's recipe and data changes; samples are compared with
    the first test faces."""
    from diffuseseg.recipe_study import STUDIES, reference_images
    from diffuseseg.unet import UNet, count_parameters
    if not (SHARED / "data" / "celeba_aligned_10k").is_dir():
        pytest.skip(f"CelebA aligned faces not found at {SHARED / 'data' / 'celeba_aligned_10k'}")
    study = STUDIES["celebahq64"]
    cfgs = {name: load_config(PRESET, [*study.base, *overrides]) for name, overrides in study.recipes.items()}
    # the preset as it was when the study ran: its 1557 training faces, before celebamask_hq_extra
    assert cfgs["lean"] == load_config(PRESET, study.base) and len(training_image_files(cfgs["lean"])) == 1557
    assert cfgs["lean"].model == load_config(PRESET).model
    params = {name: count_parameters(UNet(cfg.model)) for name, cfg in cfgs.items()}
    assert params["narrow"] < params["lean"] == params["celeba_10k"] < params["wide"]
    # the recipe runs change one thing of the narrow U-Net each
    assert cfgs["narrow_lr_1e-3"].train.lr == 0.001 != cfgs["narrow"].train.lr
    assert cfgs["narrow_v_prediction"].diffusion.prediction_type == "v_prediction" != cfgs["narrow"].diffusion.prediction_type
    assert params["narrow_lr_1e-3"] == params["narrow_v_prediction"] == params["narrow_celeba_10k"] == params["narrow"]
    preset_images, with_celeba = training_image_files(cfgs["lean"]), training_image_files(cfgs["celeba_10k"])
    assert with_celeba[:len(preset_images)] == preset_images and len(with_celeba) == len(preset_images) + 10_000
    assert training_image_files(cfgs["narrow_celeba_10k"]) == with_celeba
    real, _ = reference_images(cfgs["lean"], 3)
    assert np.array_equal(real, labeled_split(cfgs["lean"], "test").load(range(3))[1])


def test_the_4468_face_study_continues_the_reference_with_one_change_each(in_repo):
    """study_recipes.py --study celebahq64_4k (issue 42): the preset continued from the reference weights as it
    is, with v-prediction, a 3.3x learning rate or Min-SNR weights, and the preset from scratch."""
    from diffuseseg.checkpoint import stored_prediction_type
    from diffuseseg.config import diff_sections, config_to_dict
    from diffuseseg.recipe_study import STUDIES
    study = STUDIES["celebahq64_4k"]
    cfgs = {name: load_config(PRESET, [*study.base, *overrides]) for name, overrides in study.recipes.items()}
    preset = config_to_dict(load_config(PRESET))
    changed = {name: diff_sections(preset, config_to_dict(cfg)) for name, cfg in cfgs.items()}
    # pinned as it ran: ε-prediction and the decoder's blocks (the preset predicts v and reads the middle blocks
    # since issue 42's long run ended) from the reference weights
    keys = {name: [d.split(":")[0] for d in diff] for name, diff in changed.items()}
    assert keys["scratch"] == ["diffusion.prediction_type", "features.blocks"]
    assert keys["continue"] == ["diffusion.prediction_type", "features.blocks", "train.init_weights"]
    assert keys["continue_v_prediction"] == ["features.blocks", "train.init_weights"]
    for name in ("continue_lr_1e-3", "continue_min_snr"):
        assert len(changed[name]) == 4 and set(changed["continue"]) < set(changed[name]), changed[name]
    assert stored_prediction_type(cfgs["continue"].train.init_weights) == "epsilon"
    assert len(training_image_files(cfgs["continue"])) == 4468


def test_tiny_end_to_end_run_on_real_faces(in_repo, tmp_path):
    """A tiny DDPM trained for two steps on six real faces, then the read-out and plain supervision on 3
    labeled faces scored on 4 val faces, as a user runs the scripts with the preset."""
    tiny = TINY + [f"train.out_dir={tmp_path / 'ddpm'}", "train.max_steps=2", "run.threads=1",
                   f"data.root={CELEBAMASK / 'labeled' / 'images'}[0:6]", "data.extra_roots=[]"]
    proc = run_script("train_ddpm.py", tiny, "--config", str(PRESET))
    assert proc.returncode == 0, proc.stderr
    study = tiny + [f"run.checkpoint={tmp_path / 'ddpm' / 'ema_fp16.pt'}", "labels.labeled_range=[0,6]", "labels.num_labeled=3",
                    "labels.val_range=[200,204]", "features.batch_size=4", "features.blocks=[ups.0,ups.1]", "conv_head.members=1", "conv_head.hidden=8",
                    "conv_head.steps=3", "segmenter.steps=4", "segmenter.batch_size=2"]
    proc = run_script("evaluate_baselines.py", study, "--config", str(PRESET), "--kinds", "ddpm", "supervised",
                      "--labeled", "3", "--draws", "1", "--split", "val", "--out", str(tmp_path / "study"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "study" / "study.json").read_text())
    assert result["num_eval_images"] == 4 and result["readout"] == "conv_head"
    assert all(0 < result["miou"][k]["3"][0] <= 1 for k in ("ddpm", "supervised"))
    # Samples scored against held-out test faces, each beside its nearest training face.
    sample = tiny + [f"run.checkpoint={tmp_path / 'ddpm' / 'ema_fp16.pt'}", f"sample.out_dir={tmp_path / 'samples'}",
                     "sample.num_images=4", "sample.steps=2", "labels.test_range=[300,305]"]
    proc = run_script("sample_ddpm.py", sample, "--config", str(PRESET), "--quality")
    assert proc.returncode == 0, proc.stderr
    quality = json.loads((tmp_path / "samples" / "quality.json").read_text())
    assert (quality["num_samples"], quality["num_train"], quality["num_held_out"]) == (4, 6, 5)
    assert quality["ratio"] > 0 and (tmp_path / "samples" / "nearest_train.png").is_file()


def test_the_bundled_read_out_segments_any_folder_of_photos_with_no_training(tmp_path):
    """The preset's ensemble.path is the tracked read-out (conv heads on the tracked DDPM's features): segment.py
    writes 19-class masks, colour masks and overlays at each photo's own size out of the box."""
    from PIL import Image
    from diffuseseg.segmentation import load_readout
    cfg = load_config(PRESET)
    bundled = REPO / cfg.ensemble.path
    assert bundled.is_file() and bundled.stat().st_size < 16 * 2 ** 20
    _, meta = load_readout(bundled)
    assert meta["class_names"] == builtin_classes("celebamask_hq").names
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(photos / "wide.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert("L").save(photos / "grey.jpg")
    out = tmp_path / "out"
    proc = run_script("segment.py", ["run.threads=1", f"segment.input_dir={photos}", f"segment.out_dir={out}",
                                     "segment.align=none"], "--config", str(PRESET))
    assert proc.returncode == 0, proc.stderr
    wide = np.asarray(Image.open(out / "masks" / "wide.png"))
    assert wide.shape == (80, 120) and np.asarray(Image.open(out / "overlay" / "wide.png")).shape == (80, 120, 3)
    assert (wide[:, :20] == 255).all() and (wide[:, 20:100] <= 18).all()  # centre crop: the ends are not guessed
    assert np.asarray(Image.open(out / "masks" / "grey.png")).max() <= 18


def test_the_bundled_read_out_segments_real_test_faces(in_repo, tmp_path):
    """On 8 real test faces the bundled read-out must segment faces, not noise (val mIoU with 20 labels was
    0.37 at 75 CPU-minutes of DDPM training; 8 faces vary, hence the lower bar)."""
    out = tmp_path / "test"
    proc = run_script("segment.py", ["run.threads=1", "labels.test_range=[300,308]", f"segment.out_dir={out}"],
                      "--config", str(PRESET))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["miou"] > 0.25 and metrics["per_class_iou"]["skin"] > 0.6


def test_the_readme_states_the_sha256_of_every_tracked_weights_file():
    """A fresh clone reproduces the README only with the files it names: their hashes are written there in full."""
    from diffuseseg.checkpoint import file_sha256
    readme = (REPO / "README.md").read_text()
    for name in ("toy_faces_32/ema_fp16.pt", "celebahq_64/ema_fp16.pt", "celebahq_64/readout/conv_heads_pool200.pt",
                 "celebahq_64_eps13k/ema_fp16.pt"):
        assert file_sha256(REPO / "checkpoints" / name, 64) in readme, f"README lacks the sha256 of {name}"
