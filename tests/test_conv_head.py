"""The convolutional read-out: independent grouped members, spatial context a pixel MLP lacks, file
round trips next to the pixel ensemble, and the scripts end to end."""
import json

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from diffuseseg.config import ConfigError, load_config
from diffuseseg.conv_head import ConvHeadEnsemble, FeatureRows, train_conv_heads
from diffuseseg.label_formats import ClassList
from diffuseseg.features import FeatureSpec
from diffuseseg.pixel_classifier import PixelEnsemble, save_ensemble, train_ensemble
from diffuseseg.segmentation import build_extractor, classify, fit_readout, load_readout, member_scores, save_readout
from diffuseseg.views import View, ViewSet


def test_members_are_independent_heads_in_one_grouped_network(one_thread):
    heads = ConvHeadEnsemble(in_dim=6, num_classes=4, members=3, hidden=16).eval()
    x = torch.randn(2, 6, 8, 8)
    before = heads(x)
    assert before.shape == (3, 2, 4, 8, 8)
    with torch.no_grad():  # change only member 1's second 3x3 conv (channels 16..31 of the grouped conv)
        heads.net[6].weight[16:32].add_(1.0)
    after = heads(x)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


def _neighbour_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Label 1 where the pixel's LEFT neighbour has a positive first channel: no information in the
    pixel's own features, so only a read-out that sees neighbours can learn it."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12, 12, 3)).astype(np.float16)
    left = np.roll(x[..., 0], 1, axis=2)
    y = (left > 0).astype(np.uint8)
    y[:, :, 0] = 255  # the wrapped-around column has no left neighbour
    return x, y


def test_conv_heads_learn_from_neighbours_where_pixel_mlps_cannot(one_thread):
    x, y = _neighbour_task(16, 0)
    x_test, y_test = _neighbour_task(8, 1)
    valid = y_test != 255
    heads = train_conv_heads(x, y, 2, members=2, hidden=16, steps=150, batch_size=8, lr=3e-3, shift=0,
                             progress=False)
    pred = heads.member_logits(x_test).mean(0).argmax(-1).numpy()
    conv_acc = (pred == y_test)[valid].mean()
    keep = y.reshape(-1) != 255
    mlps = train_ensemble(x.reshape(-1, 3)[keep], y.reshape(-1)[keep], 2, members=2, max_epochs=3, min_steps=0,
                          progress=False)
    mlp_pred = member_scores(mlps, [x_test.astype(np.float32)]).mean(0).argmax(-1).reshape(y_test.shape).numpy()
    mlp_acc = (mlp_pred == y_test)[valid].mean()
    assert conv_acc > 0.9, conv_acc
    assert mlp_acc < 0.65, mlp_acc  # chance level: its own features say nothing


def test_heads_trained_on_windows_segment_whole_maps(one_thread):
    """conv_head.crop: trained on random 6 px windows of the 12 px maps, the heads still label whole maps."""
    x, y = _neighbour_task(16, 0)
    x_test, y_test = _neighbour_task(8, 1)
    heads = train_conv_heads(x, y, 2, members=2, hidden=16, steps=150, batch_size=8, lr=3e-3, shift=0, crop=6,
                             progress=False)
    pred = heads.member_logits(x_test).mean(0).argmax(-1).numpy()
    assert pred.shape == y_test.shape
    assert (pred == y_test)[y_test != 255].mean() > 0.9
    # the study's features: one FeatureRows of picked images per view, joined by another; the same images as one
    # array give the same fit (the same windows read, in the same order)
    views = FeatureRows([FeatureRows([x], rows=np.arange(8)), FeatureRows([x], rows=np.arange(8, 16))])
    a = train_conv_heads(views, y, 2, members=2, hidden=8, steps=3, batch_size=4, crop=6, progress=False, seed=1)
    b = train_conv_heads(x, y, 2, members=2, hidden=8, steps=3, batch_size=4, crop=6, progress=False, seed=1)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(ta, tb, msg=name)


def test_training_is_reproducible_and_ignores_ignore_pixels(one_thread):
    x, y = _neighbour_task(6, 2)
    a = train_conv_heads(x, y, 2, members=2, hidden=8, steps=5, progress=False, seed=3)
    b = train_conv_heads(x, y, 2, members=2, hidden=8, steps=5, progress=False, seed=3)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    torch.manual_seed(3)
    init = ConvHeadEnsemble(3, 2, 2, 8)  # what train_conv_heads starts from with seed 3
    assert not torch.equal(a.net[0].weight, init.net[0].weight)
    # Every pixel ignored: no finite loss, no step, the weights stay at their initialisation.
    untouched = train_conv_heads(x, np.full_like(y, 255), 2, members=2, hidden=8, steps=3, progress=False, seed=3)
    for (name, t), t0 in zip(untouched.net.state_dict().items(), init.net.state_dict().values()):
        assert torch.equal(t, t0), name
    with pytest.raises(ValueError, match="outside 0..1"):
        train_conv_heads(x, np.full_like(y, 7), 2, steps=1, progress=False)


def test_fit_readout_with_views_and_file_round_trip(tmp_path, one_thread):
    cfg = load_config(REPO / "config.yaml", ["ensemble.readout=conv_head", "conv_head.members=2",
                                             "conv_head.hidden=8", "conv_head.steps=3", "labels.min_pixels=0"])
    classes = ClassList(["background", "l_eye", "r_eye"], np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], np.uint8))
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 3, (4, 8, 8)).astype(np.uint8)
    views = ViewSet("flip", (View(), View(flip=True)), [(1, 2)])
    feats = [rng.standard_normal((4, 8, 8, 5)).astype(np.float16) for _ in views.views]
    spec = FeatureSpec((50,), ("ups.0",), "shared", 0, 8, 5)
    heads, meta = fit_readout(cfg, feats, masks, views, classes, spec, progress=False)
    assert isinstance(heads, ConvHeadEnsemble) and meta["readout"] == "conv_head"
    save_readout(tmp_path / "heads.pt", heads, meta)
    loaded, loaded_meta = load_readout(tmp_path / "heads.pt")
    assert loaded_meta["class_names"] == classes.names and loaded_meta["feature_spec"] == spec.to_dict()
    a, b = classify(heads, feats, "majority", views), classify(loaded, feats, "majority", views)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_allclose(a.uncertainty, b.uncertainty)
    # The pixel ensemble's files still load through the same entry point.
    save_ensemble(tmp_path / "mlps.pt", PixelEnsemble(5, 3, members=2), {"class_names": classes.names})
    assert isinstance(load_readout(tmp_path / "mlps.pt")[0], PixelEnsemble)
    bad = load_config(REPO / "config.yaml", ["ensemble.readout=conv_head", "conv_head.hidden=12"])
    with pytest.raises(ConfigError, match="conv_head.hidden"):
        fit_readout(bad, feats, masks, views, classes, spec, progress=False)


def test_conv_head_through_train_mlps_and_segment_scripts(stack, tmp_path):
    toy = tmp_path / "toy"
    overrides = stack["overrides"] + [
        f"data.root={toy}", f"labels.labeled_dir={toy / 'labeled'}", f"labels.test_dir={toy / 'test'}",
        "labels.labeled_range=[0,4]", "labels.num_labeled=4", "labels.test_range=[0,3]", "labels.min_pixels=0",
        f"ensemble.path={tmp_path / 'heads' / 'heads.pt'}", "ensemble.readout=conv_head", "conv_head.members=2",
        "conv_head.hidden=8", "conv_head.steps=5", f"segment.out_dir={tmp_path / 'seg'}"]
    for script in ("make_toy_faces.py", "train_mlps.py", "segment.py"):
        proc = run_script(script, overrides)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    heads, meta = load_readout(tmp_path / "heads" / "heads.pt")
    assert isinstance(heads, ConvHeadEnsemble) and meta["train_views"] == "flip" and len(meta["trained_on"]) == 4
    assert len(list((tmp_path / "seg" / "masks").glob("*.png"))) == 3
    assert json.loads((tmp_path / "seg" / "metrics.json").read_text())["miou"] >= 0
    # Past features.ram_limit_mb the features are memory-mapped under store_dir while used, then removed:
    # the same heads as from RAM.
    store = tmp_path / "store"
    proc = run_script("train_mlps.py", overrides + [f"ensemble.path={tmp_path / 'mapped' / 'heads.pt'}",
                                                    "features.ram_limit_mb=0", f"features.store_dir={store}"])
    assert proc.returncode == 0, proc.stderr
    mapped, _ = load_readout(tmp_path / "mapped" / "heads.pt")
    for name, value in heads.state_dict().items():
        torch.testing.assert_close(mapped.state_dict()[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert store.is_dir() and not list(store.iterdir())


def test_compiled_training_gives_plain_heads_that_match_eager(one_thread):
    """conv_head.compile: the training forward runs through dynamo (aot_eager: no generated kernels), the
    result is the plain module (its state dict has no compiled wrapper's keys) and it scores like eager."""
    from torch._dynamo.utils import counters
    x, y = _neighbour_task(6, 2)
    kw = dict(members=2, hidden=8, steps=5, progress=False, seed=3)
    eager = train_conv_heads(x, y, 2, **kw)
    counters.clear()
    compiled = train_conv_heads(x, y, 2, compile="default", compile_backend="aot_eager", **kw)
    assert counters["stats"]["unique_graphs"] > 0
    assert type(compiled) is ConvHeadEnsemble and not any("_orig_mod" in k for k in compiled.state_dict())
    torch.testing.assert_close(compiled.member_logits(x), eager.member_logits(x), atol=1e-4, rtol=1e-3)


def test_heads_on_block_maps_equal_heads_on_the_upsampled_features(one_thread):
    """logits_of_blocks: projecting each block at its own size, then upsampling, is forward() on the maps the
    blocks make once upsampled and concatenated (linear maps commute; bilinear weights sum to one)."""
    torch.manual_seed(0)
    blocks = [torch.randn(2, 3, 4, 4) * 5, torch.randn(2, 4, 8, 8), torch.randn(2, 2, 16, 16) + 3,
              torch.randn(2, 3, 4, 4)]  # 4 px twice: summed before one upsampling
    heads = ConvHeadEnsemble(12, 5, members=2, hidden=8).eval()
    heads.mean.normal_()
    heads.std.uniform_(0.5, 4.0)
    def upsampled(blocks: list) -> torch.Tensor:
        return torch.cat([torch.nn.functional.interpolate(b, size=(16, 16), mode="bilinear", align_corners=False)
                          if b.shape[-1] != 16 else b for b in blocks], 1)
    with torch.no_grad():
        torch.testing.assert_close(heads.logits_of_blocks(blocks, 16), heads(upsampled(blocks)), atol=1e-4, rtol=1e-4)
        # the U-Net's channels-last maps give the same; so do blocks none of which is at the output size
        last = [b.contiguous(memory_format=torch.channels_last) for b in blocks]
        torch.testing.assert_close(heads.logits_of_blocks(last, 16), heads(upsampled(blocks)), atol=1e-4, rtol=1e-4)
        small = [b for b in blocks if b.shape[-1] != 16]
        small_heads = ConvHeadEnsemble(10, 5, members=2, hidden=8).eval()
        torch.testing.assert_close(small_heads.logits_of_blocks(small, 16), small_heads(upsampled(small)),
                                   atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="11 channels, the heads take 12"):
            heads.logits_of_blocks(blocks[1:] + [torch.randn(2, 2, 4, 4)], 16)


def test_scores_of_images_equal_scores_of_their_stored_features(stack):
    """image_member_scores reads conv heads straight off the U-Net's blocks, with the test views: the same
    scores as member_scores on view_features (stored float16, hence the tolerance), and the same masks."""
    from diffuseseg.segmentation import image_member_scores, view_features
    from diffuseseg.toy_faces import CLASS_NAMES, render_faces
    extractor = build_extractor(stack["cfg"])
    torch.manual_seed(2)
    heads = ConvHeadEnsemble(extractor.dim, len(CLASS_NAMES), members=2, hidden=8).eval()
    heads.std.uniform_(0.5, 2.0)
    views = ViewSet("flip", (View(), View(flip=True)), [])
    images = render_faces(range(5), 16)[0]
    stored = member_scores(heads, view_features(extractor, images, views, range(5), 2), views)
    direct = image_member_scores(extractor, heads, images, views, range(5), batch_size=2)
    assert direct.shape == stored.shape == (2, 5 * 16 * 16, len(CLASS_NAMES))
    torch.testing.assert_close(direct, stored, atol=2e-2, rtol=1e-2)
    assert (direct.mean(0).argmax(-1) == stored.mean(0).argmax(-1)).float().mean() > 0.99
