"""Test faces framed unlike the training faces (utils/robustness.py): how each framing is made from the
full-resolution files, the rank correlation, and that the unshifted row is exactly the plain test evaluation."""
import json

import numpy as np
import pytest

from diffuseseg.config import load_config
from diffuseseg.datasets import LabeledFolder, labeled_split
from diffuseseg.label_formats import ClassList, write_labeled_set
from diffuseseg.metrics import evaluate, rank_correlation
from diffuseseg.pixel_classifier import load_diffuseseg_mlps
from diffuseseg.robustness import load_variant, run_robustness
from diffuseseg.segmentation import build_extractor, configured_views, segment
from diffuseseg.toy_faces import CLASS_NAMES
from conftest import REPO, run_script, toy_split_overrides

CLASSES = ClassList(["background", "skin", "l_eye", "r_eye"],
                    np.array([[0, 0, 0], [200, 150, 120], [0, 0, 255], [255, 0, 0]], np.uint8))


@pytest.fixture
def faces(tmp_path) -> LabeledFolder:
    """Two 64 px 'faces' on disk, read at 32 px: a gradient image (so moves and flips show) and a mask with
    a left eye on the image's left, a right eye on its right."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    masks = np.ones((2, 64, 64), np.uint8)
    masks[:, :8] = 0
    masks[:, 20:28, 8:20] = 2
    masks[:, 20:28, 44:56] = 3
    write_labeled_set(tmp_path / "faces", ["a", "b"], images, masks, CLASSES)
    return LabeledFolder(tmp_path / "faces", 32, "index", CLASSES)


def test_as_is_is_the_loaders_framing_and_mirror_swaps_the_sides(faces):
    _, images, masks = faces.load()
    as_is = load_variant(faces, "as_is", 255)
    np.testing.assert_array_equal(as_is[0], images)
    np.testing.assert_array_equal(as_is[1], masks)
    mirrored_images, mirrored_masks = load_variant(faces, "mirror", 255)
    np.testing.assert_array_equal(mirrored_images, images[:, :, ::-1])
    # the flip brings the right eye to the image's left, and the swap names it l_eye, as the labels would
    assert (mirrored_masks[:, 10:14, 4:10] == 2).all() and (mirrored_masks[:, 10:14, 22:28] == 3).all()
    assert (mirrored_masks[:, :4] == 0).all() and (mirrored_masks == 255).sum() == 0


def test_shift_moves_the_face_and_leaves_an_unscored_grey_border(faces):
    _, images, masks = faces.load()
    shifted, shifted_masks = load_variant(faces, "shift", 255, shift=0.125)  # 4 of 32 px
    np.testing.assert_array_equal(shifted[:, 4:, 4:], images[:, :-4, :-4])
    np.testing.assert_array_equal(shifted_masks[:, 4:, 4:], masks[:, :-4, :-4])
    assert (shifted[:, :4] == 128).all() and (shifted[:, :, :4] == 128).all()
    assert (shifted_masks[:, :4] == 255).all() and (shifted_masks[:, :, :4] == 255).all()


def test_zoom_out_shrinks_the_face_about_the_centre(faces):
    _, images, masks = faces.load()
    zoomed, zoomed_masks = load_variant(faces, "zoom_out", 255, zoom_out=0.25)  # 24 of 32 px, 4 px border
    scored = zoomed_masks != 255
    assert scored[:, 4:28, 4:28].all() and scored.sum() == 2 * 24 * 24
    assert (zoomed[:, :4] == 128).all() and (zoomed[:, 28:] == 128).all()
    # the eyes keep their sides and shrink by the zoom: 6 x 2 px of 3/4 scale is 4.5 x 1.5 -> a few px each
    for eye in (2, 3):
        assert 0 < (zoomed_masks[0] == eye).sum() < (masks[0] == eye).sum()
    assert np.argwhere(zoomed_masks[0] == 2)[:, 1].max() < 16 < np.argwhere(zoomed_masks[0] == 3)[:, 1].min()


def test_rank_correlation_is_spearmans_with_ties_and_nans():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [9, 3, 2, 1]) == pytest.approx(-1.0)
    # scipy.stats.spearmanr([1, 2, 2, 4], [1, 3, 2, 4]) = 0.9486832980505138
    assert rank_correlation([1, 2, 2, 4], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)
    assert rank_correlation([1, np.nan, 3, 2], [1, 5, 3, 2]) == pytest.approx(1.0)  # NaN pair left out
    assert np.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


def test_unshifted_row_is_the_plain_test_evaluation_and_the_script_writes_its_table(stack, tmp_path, one_thread):
    cfg_overrides = toy_split_overrides(tmp_path / "toy", 4, 4, "test", 6) + stack["overrides"]  # stack: classes
    cfg = load_config(REPO / "config.yaml", cfg_overrides)
    split = labeled_split(cfg, "test")
    extractor = build_extractor(cfg)
    mlps = load_diffuseseg_mlps(sorted((stack["root"] / "mlps").iterdir()))
    views = configured_views(cfg, CLASS_NAMES, "test")
    result = run_robustness(extractor, mlps, split, cfg.labels.ignore_index, vote_mode=cfg.ensemble.vote,
                            views=views, batch_size=cfg.features.batch_size, progress=False)
    _, images, gt = split.load()
    plain = segment(extractor, mlps, images, views=views, vote_mode=cfg.ensemble.vote,
                    batch_size=cfg.features.batch_size)
    report = evaluate(list(plain.masks), list(gt), CLASS_NAMES, cfg.labels.ignore_index)
    as_is = result.variants["as_is"]
    assert as_is.miou == report.miou and as_is.uncertainty == [round(float(u), 6) for u in plain.image_scores]
    assert list(result.variants) == ["as_is", "shift", "zoom_out", "mirror"]
    assert all(0 <= r.miou <= 1 and len(r.per_image_miou) == 6 for r in result.variants.values())
    assert -1 <= result.pooled_rank_correlation <= 1

    proc = run_script("robustness.py", cfg_overrides, "--out", str(tmp_path / "out"), "--variants", "as_is", "mirror")
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert list(saved["variants"]) == ["as_is", "mirror"]
    assert saved["variants"]["as_is"]["miou"] == pytest.approx(report.miou)
    assert "| mirror |" in (tmp_path / "out" / "robustness.md").read_text()
    assert (tmp_path / "out" / "robustness.png").is_file() and (tmp_path / "out" / "config.yaml").is_file()


def test_photo_variants_carry_the_truth_with_the_face():
    """segment.py's photo table (--photos): each variant moves, scales or turns the truth exactly as the face,
    grey canvas is ignore, and two faces sit side by side."""
    from PIL import Image
    from diffuseseg.robustness import PHOTO_VARIANTS, photo_variant
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    image = Image.fromarray(np.dstack([mask * 200] * 3).astype(np.uint8))
    other = Image.fromarray(np.full((64, 64), 2, np.uint8))
    dark = Image.new("RGB", (64, 64))  # the partner face: dark, all class 2
    shapes = {}
    for variant in PHOTO_VARIANTS:
        photo, truth = photo_variant(image, Image.fromarray(mask), variant, 255,
                                     (dark, other) if variant == "two_faces" else None, side=32)
        assert truth.shape == (photo.size[1], photo.size[0])
        shapes[variant] = truth.shape
        bright = np.asarray(photo)[..., 0] > 150
        # the face's square is where its truth says (a turned square's edge pixels resample differently)
        assert (truth[bright] == 1).mean() > (0.95 if variant.startswith("rotate") else 0.999), variant
    assert shapes["two_faces"] == (32, 64) and shapes["portrait"] == (32, 24)
    _, shifted = photo_variant(image, Image.fromarray(mask), "shift_25", 255, side=32)
    assert (shifted[:8] == 255).all() and (shifted[8 + 8:8 + 24, 8 + 8:8 + 24] == 1).all()
    _, two = photo_variant(image, Image.fromarray(mask), "two_faces", 255, (dark, other), side=32)
    assert (two[:, 32:] == 2).all()
    _, turned = photo_variant(image, Image.fromarray(mask), "rotate_30", 255, side=32)
    assert turned[0, 0] == 255 and turned[16, 16] == 1  # corners came from outside the file


def test_the_carried_column_moves_the_as_is_masks_with_each_photo(faces):
    """--photos' "as-is masks carried": a segmenter's masks of the as-is photos, moved along each variant's own
    transform, score what perfect alignment would. A stand-in segmenter that knows only the as-is framing (it
    returns the as-is truth stretched over any photo; the carrying is under test, not a model) is perfect as is,
    wrong once the face moves, and perfect again when its as-is masks are carried."""
    from types import SimpleNamespace
    from PIL import Image
    from diffuseseg.robustness import CARRIED, run_photo_robustness, split_photo
    as_is = Image.fromarray(split_photo(faces, 0, "as_is", 255)[1])

    class AsIsOnly:
        background = 0

        def segment(self, photos):
            return [SimpleNamespace(mask=np.asarray(as_is.resize(p.size, Image.NEAREST)), faces=[{}]) for p in photos]

    results = run_photo_robustness({"as_is_only": AsIsOnly()}, faces, 255, variants=["shift_25", "two_faces", "as_is"],
                                   limit=1, progress=False, carry="as_is_only")
    assert list(results) == ["as_is_only", CARRIED] and list(results[CARRIED]) == ["as_is", "shift_25", "two_faces"]
    assert results["as_is_only"]["as_is"].miou == results[CARRIED]["as_is"].miou == pytest.approx(1.0)
    assert results["as_is_only"]["shift_25"].miou < 0.8 and results["as_is_only"]["two_faces"].miou < 0.8
    # moved with the face (and beside its partner, segmented as is for the purpose): right up to resampling
    assert results[CARRIED]["shift_25"].miou > 0.97 and results[CARRIED]["two_faces"].miou > 0.97
    with pytest.raises(ValueError, match="needs that segmenter and the as_is variant"):
        run_photo_robustness({"as_is_only": AsIsOnly()}, faces, 255, variants=["shift_25"], limit=1, carry="as_is_only")


def test_each_segmenter_is_compared_with_the_baseline_photo_by_photo(faces):
    """baseline: every other segmenter's row carries its difference to the baseline's with a paired interval,
    and the table shows it; a baseline that is not one of the segmenters is named."""
    from types import SimpleNamespace
    from diffuseseg.robustness import photo_table, run_photo_robustness, split_photo

    class Truth:  # the transformed truth itself, of the faces in order (the comparison is under test, not a model)
        background = 0

        def segment(self, photos):
            truths = [split_photo(faces, k, "shift_10", 255)[1] for k in range(len(photos))]
            return [SimpleNamespace(mask=np.where(t == 255, 0, t).astype(np.uint8), faces=[{}]) for t in truths]

    class Background:
        background = 0

        def segment(self, photos):
            return [SimpleNamespace(mask=np.zeros(p.size[::-1], np.uint8), faces=[]) for p in photos]

    results = run_photo_robustness({"none": Background(), "truth": Truth()}, faces, 255, variants=["shift_10"],
                                   limit=2, progress=False, baseline="none")
    diff, low, high = results["truth"]["shift_10"].vs_baseline
    assert results["none"]["shift_10"].vs_baseline is None
    assert diff == pytest.approx(results["truth"]["shift_10"].miou - results["none"]["shift_10"].miou) and diff > 0.5
    assert low <= diff <= high
    assert "truth − none [95 %]" in photo_table(results, 2, "none")
    with pytest.raises(ValueError, match="baseline='off' is not one of the segmenters"):
        run_photo_robustness({"none": Background()}, faces, 255, variants=["shift_10"], limit=1, baseline="off")


def test_the_as_is_difference_is_split_by_how_each_face_was_framed(faces):
    """aligned_photo_losses: per aligning segmenter, the as-is photos whose face was cut out along its own
    transform, apart from the rest and split by whether that transform saw every landmark it is fit to. Stand-ins
    with known outcomes (the grouping is under test, not a model): photo 0 cut with all landmarks and right,
    photo 1 cut without an eye and wrong (all background)."""
    from types import SimpleNamespace
    from diffuseseg.face_align import Canonical
    from diffuseseg.robustness import aligned_photo_losses, run_photo_robustness, split_photo
    truths = [split_photo(faces, k, "as_is", 255)[1] for k in range(2)]
    seen, no_eye = np.zeros((4, 2)), np.zeros((4, 2))
    no_eye[0] = np.nan
    framing = Canonical(np.zeros((4, 2)), np.zeros((4, 2)), np.ones(4), 1, ("eye_image_left", "eye_image_right",
                                                                            "mouth"))

    class Truth:
        background, align_faces = 0, False

        def segment(self, photos):
            return [SimpleNamespace(mask=np.where(t == 255, 0, t).astype(np.uint8), faces=[{}]) for t in truths]

    class Aligner:
        background, align_faces, canonical = 0, True, framing

        def segment(self, photos):
            framed = [(False, seen), (False, no_eye)]
            masks = [np.where(truths[0] == 255, 0, truths[0]), np.zeros_like(truths[1])]
            return [SimpleNamespace(mask=m.astype(np.uint8), faces=[SimpleNamespace(snapped=s, landmarks=l)])
                    for m, (s, l) in zip(masks, framed)]

    results = run_photo_robustness({"off": Truth(), "aligner": Aligner()}, faces, 255, variants=["as_is"], limit=2,
                                   progress=False, baseline="off")
    assert results["off"]["as_is"].aligned is None  # a segmenter that does not align records nothing
    assert results["aligner"]["as_is"].aligned == [1, 1]
    assert results["aligner"]["as_is"].fit_incomplete == [0, 1]
    text = aligned_photo_losses(results, "off")
    assert "fit to every landmark: 1 photos, +0.000 each" in text
    assert "kept as framed: 0 photos" in text and "no face found: 0 photos" in text
    lost = results["aligner"]["as_is"].per_image_miou[1] - results["off"]["as_is"].per_image_miou[1]
    assert lost < -0.5 and f"an eye or the mouth not found: 1 photos, {lost:+.3f} each" in text
    assert aligned_photo_losses(results, "none") == ""


def test_true_placements_put_the_crop_where_each_variant_put_the_face():
    """true_placements: sampling a variant's truth along its placement gives back the as-is truth at the crop's
    size (up to resampling where the face was scaled or turned); a wrong turn's sign would not."""
    from PIL import Image
    from diffuseseg.face_align import Similarity
    from diffuseseg.robustness import PHOTO_VARIANTS, photo_variant, true_placements
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 5, (8, 8)).astype(np.uint8)
    mask = np.kron(blocks, np.ones((16, 16), np.uint8))           # 128 px of 16 px blocks: parts to place
    partner = np.kron(rng.integers(0, 5, (8, 8)).astype(np.uint8), np.ones((16, 16), np.uint8))
    image = Image.new("RGB", (128, 128))
    centres = (np.arange(32) + 0.5)
    points = np.stack(np.meshgrid(centres, centres), -1).reshape(-1, 2)

    def agreement(truth: np.ndarray, where: Similarity, expected: np.ndarray) -> float:
        q = where.apply(points)
        inside = (q >= 0).all(1) & (q[:, 0] < truth.shape[1]) & (q[:, 1] < truth.shape[0])
        got = truth[q[inside, 1].astype(int), q[inside, 0].astype(int)]
        want = expected[(points[inside, 1] * 2).astype(int), (points[inside, 0] * 2).astype(int)]
        return float((got[got != 255] == want[got != 255]).mean())
    _, as_is = photo_variant(image, Image.fromarray(mask), "as_is", 255, side=64)
    _, other = photo_variant(image, Image.fromarray(partner), "as_is", 255, side=64)
    for variant in PHOTO_VARIANTS:
        _, truth = photo_variant(image, Image.fromarray(mask), variant, 255, (image, Image.fromarray(partner)), side=64)
        placements = true_placements(variant, 32, side=64)
        assert len(placements) == (2 if variant == "two_faces" else 1)
        for where, expected in zip(placements, (as_is, other)):
            assert agreement(truth, where, expected) > 0.95, variant
    right = true_placements("rotate_30", 32, side=64)[0]
    _, truth = photo_variant(image, Image.fromarray(mask), "rotate_30", 255, side=64)
    turned_back = Similarity(right.scale, -right.angle, 0.0, 0.0)   # the other way, the crop's centre kept
    tx, ty = np.array([32.0, 32.0]) - turned_back.apply(np.array([[16.0, 16.0]]))[0]
    assert agreement(truth, Similarity(right.scale, -right.angle, tx, ty), as_is) < 0.8


def test_the_placed_column_reads_out_crops_placed_by_the_truth(faces):
    """placed: the segmenter is handed each photo's faces where photo_variant put them (its own finding
    bypassed); a stand-in that pastes the as-is truth along whatever placement it is given is perfect there
    and wrong when it must guess."""
    from types import SimpleNamespace
    import torch
    from diffuseseg.face_align import paste_back
    from diffuseseg.robustness import PLACED, run_photo_robustness, split_photo
    as_is = np.where(split_photo(faces, 0, "as_is", 255)[1] == 255, 0, split_photo(faces, 0, "as_is", 255)[1])

    class Paster:  # pastes face 0's as-is truth, at the crop's size, along each face it is given
        background, side, crop = 0, 32, "center"

        def segment(self, photos, placed=None):
            crop = torch.nn.functional.one_hot(torch.from_numpy(as_is[::8, ::8].astype(np.int64)), 4).float()
            out = []
            for k, p in enumerate(photos):
                best = np.full(p.size[::-1], -1.0, np.float32)
                labels = np.zeros(p.size[::-1], np.uint8)
                for face in (placed[k] if placed is not None else []):
                    paste_back(crop, face.where, self.side, best, labels)
                out.append(SimpleNamespace(mask=labels, faces=[{}]))
            return out

    results = run_photo_robustness({"paster": Paster()}, faces, 255, variants=["shift_25", "rotate_15"], limit=1,
                                   progress=False, placed="paster")
    assert results["paster"]["shift_25"].miou < 0.5                 # finds nothing by itself: all background
    assert results[PLACED]["shift_25"].miou > 0.9 and results[PLACED]["rotate_15"].miou > 0.85
    with pytest.raises(ValueError, match="placed='off' is not one of the segmenters"):
        run_photo_robustness({"paster": Paster()}, faces, 255, variants=["shift_25"], limit=1, placed="off")
