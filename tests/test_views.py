"""Views (mirrors, 1-px shifts) for the pixel classifier: transforms, inverses, and test-time augmentation."""
import numpy as np
import pytest
import torch

from diffuseseg.config import ConfigError
from diffuseseg.features import RawPixelFeatures
from diffuseseg.pixel_classifier import PixelEnsemble
from diffuseseg.segmentation import segment, view_features, view_training_pixels
from diffuseseg.toy_faces import CLASS_NAMES, render_faces
from diffuseseg.views import NO_VIEWS, VIEW_SETS, View, resolve_views

C = len(CLASS_NAMES)
L_EYE, R_EYE = CLASS_NAMES.index("l_eye"), CLASS_NAMES.index("r_eye")


def one_hot(masks: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.from_numpy(masks).long(), C).float()


def test_view_transforms_images_and_masks_consistently():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(1, 4, 5, 3)
    shifted = View(dy=1, dx=-1).images(image)
    assert shifted[0, 1, 0].tolist() == image[0, 0, 1].tolist()       # out[y, x] = in[y - dy, x - dx]
    assert (shifted[0, 0] == shifted[0, 1]).all()                      # the vacated top row repeats the edge
    mask = np.zeros((1, 4, 5), np.uint8)
    mask[0, 1, 0], mask[0, 2, 4] = L_EYE, 7
    mirrored = View(flip=True).masks(mask, [(L_EYE, R_EYE)])
    assert mirrored[0, 1, 4] == R_EYE and mirrored[0, 2, 0] == 7      # mirrored, and the sides swap names


@pytest.mark.parametrize("view", VIEW_SETS["flip_shift"])
def test_back_undoes_a_view(view):
    """A prediction made in a view and mapped back lands where the pixel was: exact for mirrors, exact
    off the one row/column a shift pushed out of the image."""
    masks = render_faces(range(2), 16)[1]
    views = resolve_views("flip_shift", CLASS_NAMES, "k")
    back = view.back(one_hot(view.masks(masks, views.flip_pairs)), views.class_order).argmax(-1).numpy()
    keep = np.ones((16, 16), bool)
    if view.dy:
        keep[-1 if view.dy > 0 else 0, :] = False
    if view.dx:
        keep[:, -1 if (view.dx > 0) != view.flip else 0] = False  # the shift happens in the mirrored frame
    np.testing.assert_array_equal(back[:, keep], masks[:, keep])


def test_flip_views_need_paired_sides():
    assert len(resolve_views("flip", CLASS_NAMES, "k")) == 2 and resolve_views("flip", CLASS_NAMES, "k").flip_pairs
    with pytest.raises(ConfigError, match=r"ensemble.test_views: 'flip' mirrors images.*l_hand"):
        resolve_views("flip", ["background", "l_hand"], "ensemble.test_views")
    assert resolve_views("none", ["background", "l_hand"], "ensemble.test_views").views == NO_VIEWS.views
    with pytest.raises(ConfigError, match="ensemble.train_views: 'rotate'"):
        resolve_views("rotate", CLASS_NAMES, "ensemble.train_views")


def test_training_views_add_mirrored_rows_with_swapped_sides():
    images, masks = render_faces(range(3), 16)[:2]
    views = resolve_views("flip", CLASS_NAMES, "k")
    extractor = RawPixelFeatures(16)
    x, y = view_training_pixels(view_features(extractor, images, views), masks, views, 0, 255)
    x1, y1 = view_training_pixels(view_features(extractor, images, NO_VIEWS), masks, NO_VIEWS, 0, 255)
    assert len(y) == 2 * len(y1)
    np.testing.assert_array_equal(x[:len(y1)], x1)
    assert (y[len(y1):] == L_EYE).sum() == (y1 == R_EYE).sum() and (y[len(y1):] == R_EYE).sum() == (y1 == L_EYE).sum()


def test_mirror_test_views_make_the_prediction_mirror_equivariant():
    """With test_views=flip the prediction for a mirrored face is the mirrored prediction, l/r swapped,
    exactly (the uncertainty to rounding); without views an (untrained) pixel classifier is not."""
    torch.manual_seed(0)
    images = render_faces(range(4), 16)[0]
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    extractor = RawPixelFeatures(16)  # x/y coordinates in the features: not mirror-invariant by itself
    ensemble = PixelEnsemble(extractor.dim, C, 3).eval()
    views = resolve_views("flip", CLASS_NAMES, "k")
    for vs, exact in ((views, True), (NO_VIEWS, False)):
        a, b = segment(extractor, ensemble, images, views=vs), segment(extractor, ensemble, mirrored, views=vs)
        expect = View(flip=True).masks(a.masks, views.flip_pairs)
        assert np.array_equal(b.masks, expect) == exact
        if exact:
            # the same terms summed in another class order; JS is a difference of entropies: rounding
            np.testing.assert_allclose(b.uncertainty, a.uncertainty[:, :, ::-1], rtol=1e-4, atol=1e-5)


def test_cut_views_cover_a_quarter_in_the_aligners_grey_and_ignore_its_labels():
    """flip_cut (issue 43): each side of the (mirrored) face a quarter covered, as the aligner fills what lies
    outside a photo; the covered labels are ignored, the rest are the plain view's; never a test view."""
    from diffuseseg.image_io import PAD_FILL
    images, masks = render_faces(range(2), 16)[:2]
    views = resolve_views("flip_cut", CLASS_NAMES, "ensemble.train_views")
    assert len(views) == 10 and sum(not v.cut_side for v in views.views) == 2
    left = View(flip=True, cut_side="left", cut=0.25)
    cut_images, cut_masks = left.images(images), left.masks(masks, views.flip_pairs, ignore_index=250)
    plain_images, plain_masks = View(flip=True).images(images), View(flip=True).masks(masks, views.flip_pairs)
    assert (cut_images[:, :, :4] == PAD_FILL).all() and (cut_masks[:, :, :4] == 250).all()
    np.testing.assert_array_equal(cut_images[:, :, 4:], plain_images[:, :, 4:])
    np.testing.assert_array_equal(cut_masks[:, :, 4:], plain_masks[:, :, 4:])
    before = masks.copy()
    bottom = View(cut_side="bottom", cut=0.25).masks(masks, [])
    assert (bottom[:, 12:] == 255).all() and np.array_equal(bottom[:, :12], masks[:, :12])
    assert np.array_equal(masks, before)  # the caller's masks untouched
    with pytest.raises(ConfigError, match="ensemble.test_views: 'flip_cut' covers, turns or scales each image"):
        resolve_views("flip_cut", CLASS_NAMES, "ensemble.test_views")
    with pytest.raises(ValueError, match="for training"):
        left.back(one_hot(masks), views.class_order)


def test_turned_views_move_image_and_mask_together_and_ignore_what_came_from_outside():
    """flip_turn (issue 43): the face turned or scaled about its centre as a slightly misplaced aligned crop
    is; the mask moves with the picture, and pixels that came from outside the frame are ignored."""
    from PIL import Image
    images = np.zeros((1, 32, 32, 3), np.uint8)
    images[0, 14:18, 4:12] = 255
    masks = (images[..., 0] > 0).astype(np.uint8) * L_EYE
    quarter = View(turn=90)  # counter-clockwise as shown, as PIL's rotate
    np.testing.assert_array_equal(quarter.images(images)[0], np.asarray(Image.fromarray(images[0]).rotate(90)))
    turned = quarter.masks(masks, [], ignore_index=250)
    assert np.array_equal(turned[0] == L_EYE, quarter.images(images)[0, :, :, 0] > 127)
    assert not (turned == 250).any()  # a square turned a quarter about its centre stays inside
    small = View(zoom=0.5).masks(masks, [], ignore_index=250)
    assert (small[0, :8] == 250).all() and (small[0, 8:24, 8:24] != 250).all()  # the outer ring came from outside
    shrunk = View(zoom=0.5).images(images)
    assert (shrunk[0, :8] == 0).all()  # edge pixels continued there (black at this frame's edge), not grey
    views = resolve_views("flip_turn", CLASS_NAMES, "ensemble.train_views")
    assert len(views) == 10 and sum(v.training_only for v in views.views) == 8
    with pytest.raises(ConfigError, match="'flip_turn' covers, turns or scales each image"):
        resolve_views("flip_turn", CLASS_NAMES, "ensemble.test_views")
    with pytest.raises(ValueError, match="for training"):
        quarter.back(one_hot(masks), views.class_order)
