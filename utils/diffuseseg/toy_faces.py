"""The embedded "toy faces" data set: procedural cartoon portraits with exact part labels.

Each face is a set of parameters drawn from its own generator ``default_rng([seed, index])``
(so a face never depends on the rest of the batch), then rasterised at any size from
signed-distance shapes (negative inside, in image units where the image spans [-1, 1]).
The label of a pixel is the topmost shape whose signed distance is negative at the pixel
centre; the image paints the same shapes with a one-pixel anti-aliased edge, so the two agree.
Classes follow CelebAMask-HQ: ``l_eye`` is the person's left eye, on the RIGHT of the image.
"""

from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "background", "skin", "hair", "l_eye", "r_eye", "brows", "nose",
    "mouth", "ears", "neck", "cloth", "hat", "glasses",
)
_ID = {name: i for i, name in enumerate(CLASS_NAMES)}

# Mask preview colours, one per class in CLASS_NAMES order (background black).
PALETTE: np.ndarray = np.array([
    (0, 0, 0), (230, 170, 130), (120, 60, 20), (0, 110, 255), (0, 220, 255),
    (150, 0, 190), (255, 130, 0), (220, 20, 60), (255, 230, 0), (110, 200, 70),
    (120, 120, 120), (0, 150, 130), (255, 255, 255),
], dtype=np.uint8)

# Anchor colours (RGB in [0, 1]); a face interpolates / jitters around them.
_SKIN = np.array([(0.99, 0.87, 0.78), (0.93, 0.74, 0.62), (0.80, 0.58, 0.42),
                  (0.60, 0.40, 0.27), (0.36, 0.23, 0.15)])
_HAIR = np.array([(0.07, 0.06, 0.06), (0.22, 0.14, 0.09), (0.42, 0.27, 0.15),
                  (0.55, 0.22, 0.10), (0.86, 0.72, 0.45), (0.88, 0.86, 0.80), (0.55, 0.55, 0.55)])
_HAIR_P = np.array([0.26, 0.24, 0.18, 0.08, 0.12, 0.04, 0.08])
_IRIS = np.array([(0.30, 0.18, 0.08), (0.15, 0.10, 0.06), (0.25, 0.45, 0.75),
                  (0.30, 0.50, 0.30), (0.45, 0.48, 0.50)])
_HAIR_STYLES = ("short", "long", "bob", "buzz", "bun", "bald")
_HAIR_STYLE_P = (0.30, 0.28, 0.13, 0.10, 0.13, 0.06)


# ----------------------------------------------------------------- signed distances
def _local(x, y, cx, cy, ang):
    """Coordinates relative to (cx, cy), rotated by -ang (shape frame)."""
    x, y = x - cx, y - cy
    if ang:
        c, s = np.cos(ang), np.sin(ang)
        x, y = c * x + s * y, -s * x + c * y
    return x, y


def _ellipse(x, y, cx, cy, a, b, ang=0.0):
    """Approximate signed distance to an ellipse: exact on its boundary, good near it."""
    x, y = _local(x, y, cx, cy, ang)
    x = x + 1e-6  # avoids 0/0 exactly at the centre
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / k1


def _box(x, y, cx, cy, hw, hh, r=0.0, ang=0.0):
    """Exact signed distance to a box of half-size (hw, hh) with corner radius r."""
    x, y = _local(x, y, cx, cy, ang)
    qx, qy = np.abs(x) - hw + r, np.abs(y) - hh + r
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r


def _polygon(x, y, pts):
    """Signed distance (exact near edges) to a convex polygon: max over its half-planes."""
    pts = np.asarray(pts, dtype=float)
    nxt = np.roll(pts, -1, axis=0)
    area = np.sum(pts[:, 0] * nxt[:, 1] - nxt[:, 0] * pts[:, 1])
    d = None
    for (x0, y0), (x1, y1) in zip(pts, nxt):
        ex, ey = x1 - x0, y1 - y0
        n = np.hypot(ex, ey) * np.sign(area)
        di = ((x - x0) * ey - (y - y0) * ex) / n  # outward normal for either winding
        d = di if d is None else np.maximum(d, di)
    return d


# ----------------------------------------------------------------- parameters
def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _jitter(rng, c, amount):
    return np.clip(c + rng.uniform(-amount, amount, 3), 0.0, 1.0)


def _draw_params(rng: np.random.Generator) -> dict:
    """All random choices of one face, independent of the output size."""
    U = rng.uniform
    p: dict = {}
    # Pose and scale: head half-width s (image units), tilt about the chin pivot, small yaw.
    p["s"] = U(0.43, 0.56)
    p["cx"], p["cy"] = U(-0.08, 0.08), U(-0.16, -0.02)
    p["rot"] = np.deg2rad(U(-15, 15))
    p["yaw"] = U(-0.2, 0.2)
    p["body_rot"] = p["rot"] * U(0.0, 0.4) + np.deg2rad(U(-3, 3))
    # Face shape (face units: head half-width 1, y down, origin at the face centre).
    p["face_h"] = U(1.10, 1.22)
    p["jaw_w"], p["jaw_h"] = U(0.68, 0.85), U(0.85, 1.0)
    # Colours.
    t = U(0, 1) * (len(_SKIN) - 1)
    i = min(int(t), len(_SKIN) - 2)
    p["skin"] = _jitter(rng, _SKIN[i] + (t - i) * (_SKIN[i + 1] - _SKIN[i]), 0.03)
    if U() < 0.06:  # dyed hair
        p["hair"] = _hsv(U(), U(0.4, 0.8), U(0.3, 0.9))
    else:
        p["hair"] = _jitter(rng, _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)], 0.04)
    p["brow_col"] = p["hair"] * U(0.5, 0.9) if U() < 0.7 else _jitter(rng, _HAIR[1], 0.05)
    p["iris"] = _jitter(rng, _IRIS[rng.integers(len(_IRIS))], 0.05)
    p["lip"] = U(0.25, 0.8)
    p["cloth"] = [_hsv(U(), U(0, 0.9), U(0.1, 0.95)), _hsv(U(), U(0, 0.9), U(0.1, 0.95))]
    p["cloth_style"] = rng.choice(["flat", "stripes", "jacket"], p=[0.55, 0.25, 0.2])
    p["cloth_freq"], p["cloth_ph"] = U(10, 25), U(0, 6.3)
    # Lighting: direction, strength, spherical fall-off of the face.
    a = U(0, 2 * np.pi)
    p["light"] = (np.cos(a), np.sin(a), U(0.08, 0.3), U(0.1, 0.3))
    # Inner features.
    p["ey"], p["ex"] = U(-0.12, 0.02), U(0.36, 0.44)
    p["ew"], p["eh"], p["etilt"] = U(0.17, 0.24), U(0.09, 0.14), U(-0.12, 0.12)
    p["iris_r"], p["gaze"] = U(0.8, 1.05), (U(-0.04, 0.04), U(-0.02, 0.02))
    p["brow_dy"], p["brow_w"], p["brow_t"] = U(0.2, 0.3), U(1.0, 1.35), U(0.035, 0.07)
    p["brow_tilt"], p["brow_arch"] = U(-0.25, 0.25), U(0.0, 1.2)
    p["nose_y"], p["nose_w"], p["nose_top"] = U(0.38, 0.52), U(0.14, 0.24), U(0.03, 0.07)
    p["mouth_y"], p["mouth_w"] = U(0.74, 0.9), U(0.26, 0.40)
    p["smile"], p["lip_t"] = U(-0.04, 0.14), U(0.05, 0.1)
    p["open"] = U(0.3, 0.7) if U() < 0.35 else 0.0
    p["ear_y"], p["ear_w"], p["ear_h"] = U(0.12, 0.25), U(0.15, 0.2), U(0.24, 0.32)
    # Hair.
    p["style"] = str(rng.choice(_HAIR_STYLES, p=_HAIR_STYLE_P))
    p["hair_w"], p["hair_top"] = U(0.06, 0.3), U(0.05, 0.35)
    p["hair_len"] = U(2.0, 3.2) if p["style"] == "long" else U(1.15, 1.6)
    p["fringe"] = p["style"] in ("short", "long", "bob") and U() < 0.4
    p["hairline"] = U(-0.95, -0.7)
    p["temple"], p["part"] = U(0.3, 0.8), (U(-0.35, 0.35) if U() < 0.35 else 0.0)
    p["wave"] = (U(0.02, 0.05), U(8, 14), U(0, 6.3))
    p["strands"] = (U(0.02, 0.07), U(10, 24), U(0, 6.3))
    p["bun"] = (U(-0.3, 0.3), U(0.3, 0.45))
    # Neck and shoulders (body units = face units, body frame pivots at the chin).
    p["neck_w"], p["shoulder_y"] = U(0.42, 0.55), U(0.3, 0.55)
    p["shoulder_w"], p["shoulder_r"] = U(1.9, 2.5), U(0.5, 1.0)
    p["neckline"] = rng.choice(["round", "v", "crew"])
    p["neckline_w"], p["neckline_d"] = U(0.5, 1.0), U(0.15, 0.6)
    # Accessories.
    p["glasses"] = U() < 0.2
    p["glasses_col"] = _hsv(U(), U(0, 0.8), U(0.05, 0.6))
    p["glasses_shape"] = (U(0.1, 0.16), U(0.08, 0.14), U(0.0, 1.0), U(0.04, 0.07))
    p["sunglasses"] = U() < 0.3
    p["hat"] = U() < 0.2
    p["hat_style"] = rng.choice(["beanie", "brim", "cap"])
    p["hat_col"] = [_hsv(U(), U(0.2, 0.9), U(0.15, 0.9)), _hsv(U(), U(0, 0.9), U(0.1, 1.0))]
    p["hat_y"], p["hat_brim"] = U(-0.8, -0.55), U(1.35, 1.8)
    # Background.
    p["bg"] = rng.choice(["flat", "gradient", "stripes", "blobs", "waves"])
    base = _hsv(U(), U(0, 0.7), U(0.15, 1.0))
    if U() < 0.2:  # background close to the hair colour: colour alone cannot separate them
        base = _jitter(rng, p["hair"], 0.06)
    p["bg_cols"] = [base, _hsv(U(), U(0, 0.7), U(0.15, 1.0)), _jitter(rng, base, 0.25)]
    p["bg_dir"], p["bg_freq"], p["bg_ph"] = U(0, 2 * np.pi), U(4, 14), U(0, 6.3)
    p["blobs"] = [(U(-1, 1), U(-1, 1), U(0.2, 0.6), U(0.3, 1.0), _hsv(U(), U(0, 0.8), U(0.1, 1)))
                  for _ in range(5)]
    p["waves"] = [(U(0, 2 * np.pi), U(2, 9), U(0, 6.3)) for _ in range(4)]
    # Camera: blur (pixels) and noise.
    p["blur"], p["noise"] = U(0.3, 0.8), U(0.005, 0.025)
    return p


# ----------------------------------------------------------------- rasterisation
_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x right, y down), cached per size."""
    if size not in _GRIDS:
        c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
        _GRIDS[size] = (np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size)))
    return _GRIDS[size]


def _background(p, X, Y):
    c0, c1, c2 = (c[None, None, :] for c in p["bg_cols"])
    along = np.cos(p["bg_dir"]) * X + np.sin(p["bg_dir"]) * Y
    kind = p["bg"]
    if kind == "flat":
        return np.broadcast_to(c0, X.shape + (3,)).copy()
    if kind == "gradient":
        return c0 + (c1 - c0) * np.clip(0.5 + 0.5 * along, 0, 1)[..., None]
    if kind == "stripes":
        return c0 + (c2 - c0) * (0.5 + 0.5 * np.sin(p["bg_freq"] * along + p["bg_ph"]))[..., None]
    if kind == "blobs":
        img = np.broadcast_to(c0, X.shape + (3,)).copy()
        for bx, by, sig, w, col in p["blobs"]:
            g = w * np.exp(-((X - bx) ** 2 + (Y - by) ** 2) / (2 * sig * sig))
            img += g[..., None] * (col - img)
        return img
    t = sum(np.sin(f * (np.cos(a) * X + np.sin(a) * Y) + ph) for a, f, ph in p["waves"])
    return c0 + (c1 - c0) * (0.5 + 0.5 * np.tanh(t))[..., None]


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 3-tap Gaussian blur with edge padding (camera softness)."""
    w = np.exp(-1.0 / (2 * sigma * sigma))
    k = np.array([w, 1.0, w]) / (1 + 2 * w)
    for ax in (0, 1):
        pad = np.pad(img, [(1, 1) if a == ax else (0, 0) for a in range(3)], mode="edge")
        n = img.shape[ax]
        img = sum(k[i] * np.take(pad, np.arange(i, i + n), axis=ax) for i in range(3))
    return img


class _Canvas:
    """The image and its label mask, painted shape by shape (later shapes cover earlier ones)."""

    def __init__(self, img: np.ndarray, size: int, scale: float) -> None:
        self.img, self.mask = img, np.zeros((size, size), np.uint8)
        self.s, self.px = scale, 2.0 / size  # head scale; pixel pitch in image units

    def paint(self, d, colour, cls=None, opacity=1.0) -> None:
        """Composite one shape (signed distance d in head/body units) with a one-pixel soft edge."""
        d = d * self.s
        a = np.clip(0.5 - d / self.px, 0.0, opacity)[..., None]
        self.img[:] += a * (colour - self.img)
        if cls is not None:
            self.mask[d < 0] = _ID[cls]


class _Face:
    """The head frame (u, v: rotates about the chin pivot), the body frame (bx, by: its own small tilt),
    the lighting, and what one drawing step leaves for a later one (hair outline, face shape)."""

    def __init__(self, p: dict, X: np.ndarray, Y: np.ndarray) -> None:
        s, pivot_v = p["s"], 1.0
        pxi, pyi = p["cx"], p["cy"] + s * pivot_v
        u, v = _local(X, Y, pxi, pyi, p["rot"])
        self.u, self.v = u / s, v / s + pivot_v
        bx, by = _local(X, Y, pxi, pyi, p["body_rot"])
        self.bx, self.by = bx / s, by / s
        self.lx, ly, k_light, k_sphere = p["light"]
        self.shade = (1.0 + k_light * (self.lx * self.u + ly * self.v) / 1.3)[..., None]
        self.bshade = (1.0 + k_light * (self.lx * self.bx + ly * self.by) / 2.5)[..., None]
        self.face_shade = self.shade - k_sphere * np.clip(
            self.u ** 2 + ((self.v + 0.1) / p["face_h"]) ** 2, 0, 1.5)[..., None]
        self.fu = self.u - p["yaw"]  # inner features shift sideways with yaw
        self.hair_col = self.d_out = self.d_face = None  # set by the hair and face steps


def _cloth_and_neck(c: _Canvas, p: dict, f: _Face) -> None:
    """Cloth (shoulders), then neck + skin visible in the neckline."""
    bx, by, skin = f.bx, f.by, p["skin"]
    sy, nw = p["shoulder_y"], p["neck_w"]
    d_sh = _box(bx, by, 0, sy + 3.0, p["shoulder_w"], 3.0, p["shoulder_r"])
    c0, c1 = p["cloth"]
    if p["cloth_style"] == "stripes":
        cloth = c0 + (c1 - c0) * (0.5 + 0.5 * np.sin(p["cloth_freq"] * by + p["cloth_ph"]))[..., None]
    elif p["cloth_style"] == "jacket":
        cloth = c0 + (c1 - c0) * (np.abs(bx) < nw * 1.6)[..., None]
    else:
        cloth = c0
    c.paint(d_sh, cloth * f.bshade, "cloth")
    nl_w, nl_d = nw * (1.0 + p["neckline_w"]), p["neckline_d"]
    if p["neckline"] == "v":
        d_nl = _polygon(bx, by, [(-nl_w, sy - 0.5), (nl_w, sy - 0.5), (0, sy + nl_d)])
    elif p["neckline"] == "round":
        d_nl = _ellipse(bx, by, 0, sy, nl_w, nl_d)
    else:
        d_nl = _ellipse(bx, by, 0, sy, nw * 1.15, 0.08)
    flare = nw * (1 + 0.35 * np.clip(by / sy, 0, 1) ** 2)
    d_col = np.maximum(np.abs(bx) - flare, -by - 0.8)
    neck_col = skin * f.bshade * (0.72 + 0.18 * np.clip(by / sy, 0, 1))[..., None]
    c.paint(np.minimum(d_col, np.maximum(d_nl, d_sh)), neck_col, "neck")


def _back_hair(c: _Canvas, p: dict, f: _Face) -> None:
    """The hair's outer volume, and the part of it behind the face (by style)."""
    u, v, style, hw, ht = f.u, f.v, p["style"], p["hair_w"], p["hair_top"]
    amp, freq, ph = p["strands"]
    hair_col = p["hair"] * f.shade * (1 + amp * np.sin(freq * np.arctan2(u, v + 0.3) + ph))[..., None]
    ey, fh = p["ey"], p["face_h"]
    if style == "buzz":
        hair_col = 0.65 * hair_col + 0.35 * p["skin"] * f.shade  # stubble: skin shows through
        d_out = _ellipse(u, v, 0, -0.1, 1.05, fh + 0.06)
    else:
        d_out = _ellipse(u, v, 0, -0.15 - 0.5 * ht, 1 + hw, fh + 0.05 + ht)
    if style in ("long", "bob"):
        L = p["hair_len"]
        d_cur = _box(u, v, 0, L / 2, 1 + 0.9 * hw, L / 2, 0.35)
        d_gap = np.maximum(np.abs(u) - p["neck_w"] * 1.1, 0.6 - v)  # the neck stays visible
        d_back = np.maximum(np.minimum(d_out, d_cur), -d_gap)
    elif style in ("short", "bun"):
        d_back = np.maximum(d_out, v - (ey + 0.35))
    elif style == "buzz":
        d_back = np.maximum(d_out, v - (ey - 0.1))
    else:
        d_back = None
    if style == "bun":
        bu, br = p["bun"]
        d_back = np.minimum(d_back, _ellipse(u, v, bu, -(fh + 0.1 + ht) - 0.6 * br, br, br))
    if d_back is not None:
        c.paint(d_back, hair_col, "hair")
    f.hair_col, f.d_out = hair_col, d_out


def _ears(c: _Canvas, p: dict, f: _Face) -> None:
    """With yaw, the far ear slides behind the face and the near one shows more."""
    yaw, skin = p["yaw"], p["skin"]
    for side in (-1, 1):
        ex = side * (0.96 - 0.6 * max(yaw * side, 0) + 0.25 * max(-yaw * side, 0))
        ea, eb, eyy = p["ear_w"], p["ear_h"], p["ey"] + p["ear_y"]
        c.paint(_ellipse(f.u, f.v, ex, eyy, ea, eb), skin * f.face_shade * 0.95, "ears")
        c.paint(_ellipse(f.u, f.v, ex + side * 0.03, eyy, ea * 0.5, eb * 0.6), skin * f.face_shade * 0.75, "ears")


def _face_skin(c: _Canvas, p: dict, f: _Face) -> None:
    """A broad upper ellipse united with a narrower jaw, and a touch of blush (image only)."""
    u, v, fh, skin = f.u, f.v, p["face_h"], p["skin"]
    f.d_face = np.minimum(_ellipse(u, v, 0, -0.1, 1.0, fh),
                          _ellipse(u, v, 0, fh + 0.2 - p["jaw_h"], p["jaw_w"], p["jaw_h"]))
    c.paint(f.d_face, skin * f.face_shade, "skin")
    for side in (-1, 1):
        c.paint(_ellipse(f.fu, v, side * 0.5, p["ey"] + 0.42, 0.2, 0.12),
                skin * f.face_shade * np.array([1.0, 0.8, 0.8]), opacity=0.3)


def _front_hair(c: _Canvas, p: dict, f: _Face) -> None:
    """The outer volume above a hairline (fringe: low and wavy; parting: tilted)."""
    if p["style"] == "bald":
        return
    u = f.u
    if p["fringe"]:
        wa, wf, wp = p["wave"]
        line = p["ey"] - p["brow_dy"] - p["brow_t"] - 0.08 + 0.15 * u ** 2 + wa * np.sin(wf * u + wp)
    else:
        line = p["hairline"] + (0.3 if p["style"] == "buzz" else 0.0) + p["temple"] * u ** 2
    line = line + p["part"] * u
    c.paint(np.maximum(f.d_out, f.v - line), f.hair_col, "hair")


def _brows_and_eyes(c: _Canvas, p: dict, f: _Face) -> None:
    """Brows, and eyes drawn as outline, sclera, iris and pupil."""
    fu, v, yaw, ey = f.fu, f.v, p["yaw"], p["ey"]
    ew0, eh = p["ew"], p["eh"]
    for side, cls in ((-1, "r_eye"), (1, "l_eye")):
        far = 1 - 0.8 * yaw * side  # the eye turned away looks narrower
        ecx, ew = side * p["ex"] * (1 - 0.5 * yaw * side), ew0 * far
        bu, bv = _local(fu, v, ecx, ey - p["brow_dy"], -side * p["brow_tilt"])
        bv = bv + p["brow_arch"] * bu ** 2 / p["brow_w"]
        c.paint(_ellipse(bu, bv, 0, 0, ew0 * p["brow_w"] * far, p["brow_t"]), p["brow_col"] * f.shade, "brows")
        tilt = -side * p["etilt"]
        d_eye = _ellipse(fu, v, ecx, ey, ew, eh, tilt)
        c.paint(d_eye, np.array([0.12, 0.08, 0.07]), cls)
        c.paint(d_eye + 0.03, np.array([0.93, 0.92, 0.9]), cls)
        ir = eh * p["iris_r"]
        icx, icy = ecx + p["gaze"][0], ey + p["gaze"][1]
        c.paint(np.maximum(_ellipse(fu, v, icx, icy, ir, ir), d_eye + 0.02), p["iris"], cls)
        pupil = _ellipse(fu, v, icx, icy, ir * 0.45, ir * 0.45)
        c.paint(np.maximum(pupil, d_eye), np.array([0.03, 0.03, 0.03]), cls)


def _nose(c: _Canvas, p: dict, f: _Face) -> None:
    """A trapezoid bridge over a round tip, one flank lit, two nostrils."""
    v, ey, skin = f.v, p["ey"], p["skin"]
    nx, ny, nwid = 1.3 * p["yaw"], p["nose_y"], p["nose_w"]
    nu = f.u - nx
    d_nose = np.minimum(
        _polygon(nu, v, [(-p["nose_top"], ey + 0.05), (p["nose_top"], ey + 0.05),
                         (nwid * 0.8, ny - 0.05), (-nwid * 0.8, ny - 0.05)]),
        _ellipse(nu, v, 0, ny - 0.07, nwid, 0.09))
    side_light = 0.84 + 0.14 * np.tanh(8 * nu * f.lx) + 0.05 * np.tanh(6 * (v - ny))  # one lit flank
    nose_col = skin * f.face_shade * side_light[..., None]
    c.paint(d_nose, nose_col, "nose")
    for side in (-1, 1):
        c.paint(np.maximum(_ellipse(nu, v, side * nwid * 0.45, ny - 0.04, 0.06, 0.035), d_nose),
                skin * 0.45, "nose")


def _mouth(c: _Canvas, p: dict, f: _Face) -> None:
    """Lips around a smile curve; an open mouth shows its inside and teeth."""
    v, skin = f.v, p["skin"]
    mu = f.u - 0.9 * p["yaw"]
    mw, my, t = p["mouth_w"], p["mouth_y"], p["lip_t"]
    xr = np.clip(mu / mw, -1, 1)
    centre = my - p["smile"] * xr ** 2 + 0.3 * t * p["open"]
    taper = np.sqrt(1 - xr ** 2)
    half = (t + 0.5 * t * p["open"]) * (0.3 + 0.7 * taper)
    d_mouth = np.maximum(np.abs(v - centre) - half, np.abs(mu) - mw)
    lip = skin * (1 - p["lip"]) + np.array([0.78, 0.28, 0.32]) * p["lip"]
    c.paint(d_mouth, lip * f.face_shade, "mouth")
    if p["open"]:
        d_in = np.maximum(np.abs(v - centre) - half * p["open"] * 0.8, np.abs(mu) - 0.85 * mw)
        c.paint(d_in, np.array([0.25, 0.05, 0.07]), "mouth")
        c.paint(np.maximum(d_in, centre - half * p["open"] * 0.4 - v), np.array([0.9, 0.88, 0.84]), "mouth")
    else:
        c.paint(np.maximum(np.abs(v - centre) - 0.012 + 0.01 * np.abs(xr), d_mouth), lip * 0.55, "mouth")


def _glasses(c: _Canvas, p: dict, f: _Face) -> None:
    """Rounded-box frames, bridge and arms; sunglasses have dark (labelled) lenses."""
    if not p["glasses"]:
        return
    u, v, yaw, ey = f.u, f.v, p["yaw"], p["ey"]
    ew0, eh = p["ew"], p["eh"]
    gw, gh, gr, gt = p["glasses_shape"]
    rings, lenses = [], []
    for side in (-1, 1):
        ecx = side * p["ex"] * (1 - 0.5 * yaw * side) + yaw
        d_lens = _box(u, v, ecx, ey + 0.03, ew0 + gw, eh + gh, gr * min(ew0 + gw, eh + gh))
        lenses.append(d_lens)
        rings.append(np.abs(d_lens) - gt)
    d_lens = np.minimum(*lenses)
    if p["sunglasses"]:
        c.paint(d_lens, p["glasses_col"] * 0.3, "glasses")
    else:
        c.paint(d_lens, np.array([0.8, 0.9, 1.0]), opacity=0.15)  # clear lens: faint tint, eyes keep labels
    bridge = _box(u, v, yaw, ey - 0.02, p["ex"] * 0.6, gt, 0)
    arms = np.maximum(_box(u, v, 0, ey, 1.0, gt * 0.8, 0), np.maximum(f.d_face, -d_lens))
    c.paint(np.minimum(np.minimum(*rings), np.minimum(bridge, arms)), p["glasses_col"] * f.shade, "glasses")


def _hat(c: _Canvas, p: dict, f: _Face) -> None:
    """A crown over the head down to the hat line, plus a style-specific brim or band."""
    if not p["hat"]:
        return
    u, v = f.u, f.v
    hy, hc, hb = p["hat_y"], p["hat_col"][0] * f.shade, p["hat_col"][1] * f.shade
    crown_top = -(p["face_h"] + 0.15 + p["hair_top"])
    d_crown = np.maximum(_ellipse(u, v, 0, hy, 1.12 + 0.5 * p["hair_w"], hy - crown_top), v - hy)
    if p["hat_style"] == "brim":
        d_crown = np.maximum(d_crown, -(v - crown_top - 0.45))  # flat top
        c.paint(d_crown, hc, "hat")
        c.paint(np.maximum(d_crown, np.abs(v - hy + 0.15) - 0.08), hb, "hat")
        c.paint(_ellipse(u, v, 0, hy, p["hat_brim"], 0.13), hc * 0.9, "hat")
    elif p["hat_style"] == "cap":
        c.paint(d_crown, hc, "hat")
        c.paint(_ellipse(u, v, 0.15 * np.sign(p["part"] + 1e-9), hy + 0.02, 1.25, 0.12), hb, "hat")
    else:
        c.paint(d_crown, hc, "hat")
        c.paint(np.maximum(d_crown, np.abs(v - hy + 0.12) - 0.14), hb, "hat")


# The drawing steps, back to front: each paints over what came before it.
_DRAWING_STEPS = (_cloth_and_neck, _back_hair, _ears, _face_skin, _front_hair, _brows_and_eyes, _nose, _mouth,
                  _glasses, _hat)


def _rasterise(p: dict, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    X, Y = _grid(size)
    canvas, face = _Canvas(_background(p, X, Y), size, p["s"]), _Face(p, X, Y)
    for step in _DRAWING_STEPS:
        step(canvas, p, face)
    img = _blur(canvas.img, p["blur"]) + rng.normal(0.0, p["noise"], canvas.img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), canvas.mask


# ----------------------------------------------------------------- public API
def render_face(index: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One face: image (size, size, 3) uint8, mask (size, size) uint8 class ids."""
    rng = np.random.default_rng([int(seed), int(index)])
    params = _draw_params(rng)  # drawn before anything size-dependent: same face at any size
    return _rasterise(params, int(size), rng)


def render_faces(
    indices: Sequence[int] | np.ndarray, size: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stack of faces: images (N, size, size, 3) uint8, masks (N, size, size) uint8."""
    images = np.zeros((len(indices), size, size, 3), np.uint8)
    masks = np.zeros((len(indices), size, size), np.uint8)
    for n, index in enumerate(indices):
        images[n], masks[n] = render_face(int(index), size, seed)
    return images, masks
