"""Photos as people have them: rotated by an EXIF tag, grey, CMYK, 16-bit, transparent, huge, and of any
size and shape. Each decodes to what a viewer shows (or one line naming the file), and segment.py writes
their masks at their own size and framing, with what the model did not see marked, not guessed."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_script
from diffuseseg import segment_outputs
from diffuseseg.errors import DataError
from diffuseseg.image_io import PAD_FILL, TRANSPARENT_BACKGROUND, frame, framing, open_rgb
from diffuseseg.label_formats import ClassList
from diffuseseg.pixel_classifier import load_diffuseseg_mlps
from diffuseseg.segment_outputs import UNSEEN_GREY, photo_mask, read_photos, seen_region
from diffuseseg.segmentation import build_extractor, configured_views, segment
from diffuseseg.toy_faces import CLASS_NAMES, PALETTE, render_faces

ORIENTATION = 0x0112  # the EXIF tag


def _rotated_jpeg(path, stored: np.ndarray, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(stored).save(path, exif=exif, quality=95)


def test_exif_orientation_6_is_read_as_a_viewer_shows_it(tmp_path):
    # Stored 80 wide x 40 high with a red top-left corner; orientation 6 = "rotate 90 degrees clockwise to
    # show": a 40 x 80 portrait whose red corner is top-right.
    stored = np.full((40, 80, 3), (0, 200, 0), np.uint8)
    stored[:20, :20] = (255, 0, 0)
    _rotated_jpeg(tmp_path / "portrait.jpg", stored)
    shown = np.asarray(open_rgb(tmp_path / "portrait.jpg")).astype(int)
    assert shown.shape == (80, 40, 3)
    red, green = np.array([255, 0, 0]), np.array([0, 200, 0])
    assert np.abs(shown[2:18, 22:38] - red).max() <= 12  # top-right: the stored top-left corner
    for corner in (shown[2:18, 2:18], shown[62:78, 2:18], shown[62:78, 22:38]):
        assert np.abs(corner - green).max() <= 12


def test_grey_cmyk_and_16_bit_decode_to_the_colours_a_viewer_shows(tmp_path):
    grey = np.arange(0, 256, 4, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "grey.png")), np.dstack([grey] * 3))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "grey16.png")), np.dstack([grey] * 3))

    # Print colours in CMYK, each a 16 px block: cyan, magenta, yellow, black, paper white.
    inks = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0)]
    screen = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0), (255, 255, 255)]
    cmyk = Image.new("CMYK", (16 * len(inks), 16))
    for i, ink in enumerate(inks):
        cmyk.paste(ink, (16 * i, 0, 16 * i + 16, 16))
    cmyk.save(tmp_path / "print.jpg", quality=95)
    with Image.open(tmp_path / "print.jpg") as img:
        assert img.mode == "CMYK"
    rgb = np.asarray(open_rgb(tmp_path / "print.jpg")).astype(int)
    for i, colour in enumerate(screen):
        assert np.abs(rgb[4:12, 16 * i + 4:16 * i + 12] - colour).max() <= 12, (inks[i], rgb[8, 16 * i + 8])


def test_transparency_is_composited_over_white(tmp_path):
    assert TRANSPARENT_BACKGROUND == (255, 255, 255)
    rgba = np.zeros((4, 6, 4), np.uint8)  # colour under transparent pixels: black, as many programs leave it
    rgba[:, :2] = (0, 0, 0, 0)            # fully transparent -> white
    rgba[:, 2:4] = (200, 0, 0, 128)       # half-transparent red -> halfway to white
    rgba[:, 4:] = (0, 0, 255, 255)        # opaque blue -> blue
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    out = np.asarray(open_rgb(tmp_path / "rgba.png")).astype(int)
    np.testing.assert_array_equal(out[:, :2], 255)
    assert np.abs(out[:, 2:4] - np.array([200 * 128 / 255 + 127, 127, 127])).max() <= 1
    np.testing.assert_array_equal(out[:, 4:], np.broadcast_to([0, 0, 255], (4, 2, 3)))

    la = np.zeros((4, 4, 2), np.uint8)
    la[:, :2] = (30, 0)                   # grey 30, transparent -> white
    la[:, 2:] = (30, 255)                 # opaque -> grey 30
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = np.asarray(open_rgb(tmp_path / "la.png"))
    np.testing.assert_array_equal(out[:, :2], 255)
    np.testing.assert_array_equal(out[:, 2:], 30)

    # A palette image whose entry 0 is transparent (tRNS), e.g. a GIF-style logo.
    indices = np.zeros((4, 4), np.uint8)
    indices[:, 2:] = 1
    pal = Image.fromarray(indices, "P")
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.save(tmp_path / "palette.png", transparency=0)
    out = np.asarray(open_rgb(tmp_path / "palette.png"))
    np.testing.assert_array_equal(out[:, :2], 255)
    np.testing.assert_array_equal(out[:, 2:], np.broadcast_to([255, 0, 0], (4, 2, 3)))


def test_a_file_over_the_decompression_bomb_limit_is_one_line_naming_it(tmp_path, monkeypatch):
    # PIL's own guard, scaled down so the test needs no 179 MP file: warn above the limit, refuse above twice it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (20, 20)).save(tmp_path / "huge.png")     # 400 pixels > 2 x 100
    Image.new("RGB", (15, 10)).save(tmp_path / "large.png")    # 150 pixels: PIL only warns
    with pytest.raises(DataError) as err:
        open_rgb(tmp_path / "huge.png")
    message = str(err.value)
    assert f"{tmp_path / 'huge.png'} is too large to decode safely: 400 pixels, above the limit of 200" in message
    assert "downscale it" in message and "\n" not in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning on the way
        assert open_rgb(tmp_path / "large.png").size == (15, 10)
    with pytest.raises(DataError, match="huge.png is too large.*on_bad_image=skip"):
        read_photos(tmp_path, 8)
    with pytest.warns(UserWarning, match="skipping image .*huge.png"):
        names, photos, images = read_photos(tmp_path, 8, on_bad_image="skip")
    assert names == ["large"] and images.shape == (1, 8, 8, 3)


def test_framing_centre_crops_or_pads_and_says_where_the_photo_lies(tmp_path):
    ramp = np.broadcast_to((np.arange(80) * 3).astype(np.uint8)[:, None, None], (80, 40, 3)).copy()  # rows 0..79
    img = Image.fromarray(ramp)  # 40 wide, 80 high
    centre = framing(img.size, 16, "center")
    assert (centre.resized, centre.offset, centre.box) == ((16, 32), (0, -8), (0, -8, 16, 24))
    # Nearest: model row r shows photo row (r + 8 + 0.5) * 80 / 32 - 0.5 -> the middle half of the photo.
    rows = np.asarray(frame(img, centre, Image.NEAREST))[:, 0, 0] // 3
    np.testing.assert_array_equal(rows, ((np.arange(16) + 8 + 0.5) * 2.5).astype(int))
    pad = framing(img.size, 16, "pad")
    assert (pad.resized, pad.offset, pad.box) == ((8, 16), (4, 0), (4, 0, 12, 16))
    padded = np.asarray(frame(img, pad))
    assert (padded[:, :4] == PAD_FILL).all() and (padded[:, 12:] == PAD_FILL).all()
    assert padded[0, 8, 0] < padded[15, 8, 0]  # the whole photo, top to bottom
    assert framing((16, 16), 16, "pad").is_identity and framing((16, 16), 16, "center").box == (0, 0, 16, 16)


def _random_scores(members: int, grid: int, classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(members, grid, grid, classes, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("grid", [16, 8])  # the read-out at the image size, and coarser (features.label_size)
def test_photo_masks_upsample_each_members_probabilities_bilinearly(grid):
    scores = _random_scores(3, grid, 5)
    where = framing((64, 64), 16, "pad")  # fills the model's square exactly, at 4x its size
    ours = photo_mask(scores, where, "mean_softmax")
    probs = F.interpolate(scores.softmax(-1).permute(0, 3, 1, 2), size=(64, 64), mode="bilinear",
                          align_corners=False).mean(0)
    top2 = probs.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-5).numpy()  # float rounding may only matter at near-ties
    np.testing.assert_array_equal(ours[clear], probs.argmax(0).numpy()[clear])
    # majority: each member's upsampled argmax, then the most frequent (ties: the lowest class id)
    ours = photo_mask(scores, where, "majority")
    each = F.interpolate(scores.softmax(-1).permute(0, 3, 1, 2), size=(64, 64), mode="bilinear",
                         align_corners=False).argmax(1)
    counts = F.one_hot(each, 5).sum(0)
    np.testing.assert_array_equal(ours, counts.argmax(-1).numpy())


@pytest.mark.parametrize("mode", ["majority", "mean_softmax"])
def test_photo_masks_of_smooth_scores_fill_agreeing_cells_exactly(mode):
    """Scores as a read-out's are: smooth, most grid cells agreeing with their neighbours. Those cells are filled
    from the grid's vote, the others computed per pixel; together: the per-pixel computation everywhere."""
    coarse = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(2)) * 4
    scores = F.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    where = framing((64, 64), 16, "pad")
    probs = F.interpolate(scores.softmax(-1).permute(0, 3, 1, 2), size=(64, 64), mode="bilinear",
                          align_corners=False)                                      # (E, C, 64, 64)
    if mode == "majority":
        expected = F.one_hot(probs.argmax(1), 5).sum(0).argmax(-1)
    else:
        expected = probs.mean(0).argmax(0)
    ours = photo_mask(scores, where, mode)
    np.testing.assert_array_equal(ours, expected.numpy())
    assert len(np.unique(ours)) >= 3  # parts with borders, not one class


def test_large_photos_are_worked_in_strips_that_give_what_one_pass_gives(monkeypatch):
    scores = _random_scores(3, 8, 5, seed=1)
    where = framing((45, 70), 16, "center")  # 8 x 16 read-out cells upsampled to 45 x 70 photo pixels
    image = np.random.default_rng(0).integers(0, 256, (70, 45, 3), dtype=np.uint8)
    colours = segment_outputs.mask_palette(ClassList(list("abcde"), np.asarray(PALETTE[:5], np.uint8)), 255)
    whole = {mode: photo_mask(scores, where, mode) for mode in ("majority", "mean_softmax")}
    pictures = segment_outputs._colour_and_overlay(image, whole["majority"], colours, seen_region(where))
    monkeypatch.setattr(segment_outputs, "STRIP_VALUES", 3 * 5 * 45 * 3)  # 3 photo rows per strip
    monkeypatch.setattr(segment_outputs, "STRIP_PIXELS", 45 * 4)          # 4 rows per strip
    for mode, mask in whole.items():
        np.testing.assert_array_equal(photo_mask(scores, where, mode), mask, err_msg=mode)
    for one, strips in zip(pictures, segment_outputs._colour_and_overlay(image, whole["majority"], colours,
                                                                          seen_region(where))):
        np.testing.assert_array_equal(strips, one)
    assert (whole["majority"] == 255).any() and len(np.unique(whole["majority"])) > 2


def test_pixels_the_centre_crop_cut_off_are_ignore_and_the_rest_map_to_their_model_rows():
    # Each model row r predicts class r (strong logits). A 48 x 96 photo centre-cropped at 16 is scaled by 1/3
    # (to 16 x 32) and loses 8 model rows at each end: it shows its rows 24..71 to the model; rows 0..23 and
    # 72..95 are ignore.
    classes = 16
    scores = torch.full((2, 16, 16, classes), -10.0)
    for r in range(16):
        scores[:, r, :, r] = 10.0
    mask = photo_mask(scores, framing((48, 96), 16, "center"), "majority", ignore_index=255)
    assert mask.shape == (96, 48)
    assert (mask[:24] == 255).all() and (mask[72:] == 255).all() and (mask[24:72] != 255).all()
    per_row = mask[24:72]
    assert (per_row == per_row[:, :1]).all()  # constant along each row
    # photo row i lies at (i - 25) / 3 in read-out cells: its class is the nearer of the two cells around it
    expected = np.clip(np.round((np.arange(24, 72) - 25) / 3), 0, 15)
    np.testing.assert_array_equal(per_row[:, 0], expected)
    assert (photo_mask(scores, framing((48, 96), 16, "pad")) != 255).all()  # pad: every pixel was seen


def _expected_model_masks(stack, images: np.ndarray) -> np.ndarray:
    cfg = stack["cfg"]
    mlps = load_diffuseseg_mlps(sorted((stack["root"] / "mlps").iterdir()))
    return segment(build_extractor(cfg), mlps, images, views=configured_views(cfg, CLASS_NAMES, "test"),
                   vote_mode=cfg.ensemble.vote, batch_size=cfg.features.batch_size).masks


def test_segment_writes_each_photos_masks_at_its_own_size_and_framing(stack, tmp_path, one_thread):
    faces = render_faces(range(3), 16, seed=5)[0]
    photos = tmp_path / "photos"
    photos.mkdir()
    # a portrait stored sideways (shown 16 x 32: a face above another), a landscape 32 x 16 PNG, a 16 x 16 face
    portrait = np.concatenate([faces[0], faces[1]], axis=0)           # 32 high, 16 wide, as shown
    _rotated_jpeg(photos / "a_portrait.jpg", np.rot90(portrait, k=1).copy())  # stored 32 x 16; 6 = rotate back
    Image.fromarray(np.concatenate([faces[1], faces[2]], axis=1)).save(photos / "b_landscape.png")
    Image.fromarray(faces[2]).save(photos / "c_square.png")
    runs = {}
    for crop in ("center", "pad"):
        out = tmp_path / crop
        proc = run_script("segment.py", stack["overrides"] + [f"segment.input_dir={photos}", f"segment.out_dir={out}", "segment.align=none",
                                                             f"segment.crop={crop}"])
        assert proc.returncode == 0, proc.stderr
        runs[crop] = {name: np.asarray(Image.open(out / "masks" / f"{name}.png"))
                      for name in ("a_portrait", "b_landscape", "c_square")}
        for name, mask in runs[crop].items():
            shape = {"a_portrait": (32, 16), "b_landscape": (16, 32), "c_square": (16, 16)}[name]
            assert mask.shape == shape, (crop, name)
            for kind in ("colour", "overlay"):
                assert np.asarray(Image.open(out / kind / f"{name}.png")).shape == (*shape, 3)
        assert (out / "grid.png").is_file() and (out / "uncertainty.csv").read_text().count("\n") == 4

    # center: the model saw the middle 16 rows of the portrait (no scaling: 16 px wide) and the middle 16 columns
    # of the landscape, pixel for pixel, so there the masks are the model's own; the cut-off ends are ignore.
    centre = runs["center"]
    shown = np.asarray(open_rgb(photos / "a_portrait.jpg"))
    framed = np.stack([shown[8:24], np.concatenate([faces[1], faces[2]], axis=1)[:, 8:24], faces[2]])
    model = _expected_model_masks(stack, framed)
    np.testing.assert_array_equal(centre["a_portrait"][8:24], model[0])
    np.testing.assert_array_equal(centre["b_landscape"][:, 8:24], model[1])
    np.testing.assert_array_equal(centre["c_square"], model[2])
    assert (centre["a_portrait"][:8] == 255).all() and (centre["a_portrait"][24:] == 255).all()
    assert (centre["b_landscape"][:, :8] == 255).all() and (centre["b_landscape"][:, 24:] == 255).all()
    assert len(np.unique(model)) > 1

    # The masks' palette shows the classes and grey for ignore; the colour mask and the overlay hatch the
    # cut-off pixels in grey (R = G = B) and blend the seen ones half and half with the class colour.
    with Image.open(tmp_path / "center" / "masks" / "a_portrait.png") as img:
        assert img.mode == "P" and tuple(img.getpalette()[3 * 255: 3 * 256]) == UNSEEN_GREY
    colour = np.asarray(Image.open(tmp_path / "center" / "colour" / "a_portrait.png")).astype(int)
    blend = np.asarray(Image.open(tmp_path / "center" / "overlay" / "a_portrait.png")).astype(int)
    palette = np.asarray(PALETTE, int)
    np.testing.assert_array_equal(colour[8:24], palette[model[0]])
    np.testing.assert_array_equal(blend[8:24], ((shown[8:24].astype(np.float32) + palette[model[0]]) / 2).round())
    for picture in (colour, blend):
        cut = np.concatenate([picture[:8], picture[24:]])
        assert (cut[..., 0] == cut[..., 1]).all() and (cut[..., 1] == cut[..., 2]).all()
        assert len(np.unique(cut[..., 0])) > 1  # hatched, not flat

    # pad: the whole photo is segmented; the square face is the model's input either way.
    pad = runs["pad"]
    assert all((mask != 255).all() for mask in pad.values())
    np.testing.assert_array_equal(pad["c_square"], centre["c_square"])
