"""Labeled-data layouts, the class lists they use, and conversion between class lists by name.

The native layout, shared by the embedded toy faces, generated data sets and converted real data::

    <root>/images/<name>.png     RGB images
    <root>/masks/<name>.png      palette ("P") PNGs whose pixel values are class ids
    <root>/classes.json          {"names": [...], "palette": [[r, g, b], ...]}

Label formats (``labels.format``; ``pair_readers()`` adds ``index``, the native layout below)::

    palette            <root>/images/<name>.<png|jpg|jpeg>, <root>/masks/<name>.png RGB (or "P") masks whose
                       colours are the class palette (DiffuseSeg's masks: DIFFUSESEG_CLASSES). A colour that
                       is not in the palette is an error (DiffuseSeg silently made it background).
    celebamask_hq      the raw CelebAMask-HQ download: <root>/CelebA-HQ-img/<k>.jpg (1024 px) and binary part
                       masks <root>/CelebAMask-HQ-mask-anno/<k // 2000>/<k:05d>_<part>.png (512 px, on where
                       > 127), painted in the official order (later parts overwrite earlier ones) and scaled
                       to the image size with nearest neighbour. Names are <k:05d>, so name order = k order.
    ddpm_segmentation  the layout of the official ddpm-segmentation data sets: <root>/<name>.<png|jpg|jpeg>
                       with a sibling <name>.npy integer label map (H, W) (uint8; other integer dtypes are
                       accepted when every value is a valid class id, as the official loader casts them).

Every reader returns ``Pair``s sorted by name whose ``read_mask()`` gives the full-resolution uint8
class-id mask; ``LabeledFolder`` checks the sizes and resizes.

Class names across data sets: identical names correspond, and so do these synonyms:
``background`` = ``bg``; CelebAMask-HQ's ``neck_l`` = ``necklace``; CelebAMask-HQ's ``ear_r`` ("ear ring") =
``earring``. DiffuseSeg's 20 classes hold both ``ear_r`` and ``earring`` (its masks use ``ear_r``), so
DiffuseSeg -> CelebAMask-HQ merges both into ``ear_r``, and the way back gives ``ear_r`` (same name wins).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffuseseg.errors import DataError
from diffuseseg.image_io import IMAGE_SUFFIXES, list_images, open_rgb, resize_center_crop
from diffuseseg.io import atomic_save_image, atomic_write_text

IGNORE_ID = 255  # labels.ignore_index's default: the value written for --unmapped ignore


# ----------------------------------------------------------------------------------------------
# the native layout: images/<name>.png, masks/<name>.png index PNGs, classes.json

@dataclass
class ClassList:
    names: list[str]
    palette: np.ndarray  # (C, 3) uint8

    def to_json(self) -> str:
        return json.dumps({"names": self.names, "palette": self.palette.tolist()}, indent=1)

    @classmethod
    def read(cls, path: str | Path) -> "ClassList":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"class list not found: {path}")
        try:
            raw = json.loads(path.read_text())
            names, palette = list(raw["names"]), np.asarray(raw["palette"], dtype=np.uint8)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: expected {{\"names\": [...], \"palette\": [[r,g,b], ...]}}: {err}") from None
        if palette.shape != (len(names), 3):
            raise DataError(f"{path}: {len(names)} names but palette of shape {palette.shape}")
        return cls(names, palette)


def palette_image(mask: np.ndarray, palette: np.ndarray) -> Image.Image:
    """An index mask as a "P"-mode image with the class palette embedded (viewable and exact)."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(palette)] = palette
    img.putpalette(flat.reshape(-1).tolist())
    return img


def write_labeled_set(root: str | Path, names: Sequence[str], images: np.ndarray, masks: np.ndarray,
                      classes: ClassList) -> Path:
    """Write (image, mask) pairs in the labeled layout; every file is written atomically."""
    root = Path(root)
    atomic_write_text(root / "classes.json", classes.to_json())
    for name, image, mask in zip(names, images, masks):
        atomic_save_image(Image.fromarray(image), root / "images" / f"{name}.png")
        atomic_save_image(palette_image(mask, classes.palette), root / "masks" / f"{name}.png")
    return root


def read_index_mask(path: str | Path, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Read a palette or greyscale index PNG as uint8 class ids, checking the id range."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataError(f"{path}: expected an index mask (palette or greyscale PNG), got mode {img.mode}")
            mask = np.asarray(img)
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot decode mask {path}: {err}") from None
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} pixels have class ids >= {num_classes} "
                        f"(max {int(mask.max())})")
    return mask


@dataclass
class Pair:
    """One labeled example before loading: its name, image file and a mask reader (full resolution)."""
    name: str
    image_path: Path
    read_mask: Callable[[], np.ndarray]
    mask_source: str  # the mask's file(s), for error messages


def matched_image_mask_files(root: Path) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) for ``images/<name>.<png|jpg|jpeg>`` + ``masks/<name>.png``, sorted by name;
    an image without a mask or a mask without an image is an error naming one of them."""
    images = {p.stem: p for p in list_images(root / "images")}
    masks_dir = root / "masks"
    if not masks_dir.is_dir():
        raise DataError(f"mask folder not found: {masks_dir}")
    masks = {p.stem: p for p in masks_dir.glob("*.png")}
    _check_matching(images, masks, root)
    return [(k, images[k], masks[k]) for k in sorted(images)]


def index_pairs(root: Path, classes: ClassList) -> list[Pair]:
    """The native layout: images/<name>.<png|jpg> with masks/<name>.png index (palette or grey) PNGs."""
    n = len(classes.names)
    return [Pair(name, image, (lambda p=mask: read_index_mask(p, n)), str(mask))
            for name, image, mask in matched_image_mask_files(root)]


def _check_matching(images: dict, masks: dict, root: Path) -> None:
    no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if no_mask:
        raise DataError(f"{root}: {len(no_mask)} image(s) without a mask, e.g. {images[no_mask[0]]}")
    if no_image:
        raise DataError(f"{root}: {len(no_image)} mask(s) without an image, e.g. {masks[no_image[0]]}")



def _classes(pairs: Sequence[tuple[str, tuple[int, int, int]]]) -> ClassList:
    return ClassList([n for n, _ in pairs], np.asarray([c for _, c in pairs], np.uint8))


# DiffuseSeg's 20 classes (shared/reference/diffuseseg-seed-format.md; id = position).
DIFFUSESEG_CLASSES = _classes([
    ("skin", (204, 204, 255)), ("l_brow", (255, 0, 0)), ("r_brow", (255, 0, 85)), ("l_eye", (255, 0, 170)),
    ("r_eye", (255, 0, 255)), ("eye_g", (170, 0, 255)), ("l_ear", (85, 0, 255)), ("r_ear", (0, 0, 255)),
    ("ear_r", (0, 85, 255)), ("nose", (0, 170, 255)), ("mouth", (0, 255, 255)), ("u_lip", (0, 255, 170)),
    ("l_lip", (0, 255, 85)), ("hair", (0, 255, 0)), ("hat", (170, 255, 0)), ("neck", (255, 255, 0)),
    ("cloth", (255, 170, 0)), ("necklace", (255, 85, 0)), ("earring", (170, 0, 85)), ("bg", (255, 255, 255)),
])

# CelebAMask-HQ's parts in the official painting order (face_parsing/Data_preprocessing/g_mask.py);
# the class id of a part is its position + 1 (0 = background), with the official colour map.
CELEBAMASK_HQ_PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                       "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
CELEBAMASK_HQ_CLASSES = _classes(list(zip(("background",) + CELEBAMASK_HQ_PARTS, [
    (0, 0, 0), (204, 0, 0), (76, 153, 0), (204, 204, 0), (51, 51, 255), (204, 0, 204), (0, 255, 255),
    (255, 204, 204), (102, 51, 0), (255, 0, 0), (102, 204, 0), (255, 255, 0), (0, 0, 153), (0, 0, 204),
    (255, 51, 153), (0, 204, 204), (0, 51, 0), (255, 153, 51), (0, 204, 0)])))

# ddpm-segmentation's celeba_19 (alphabetical) with its palette (src/data_util.py).
CELEBA19_CLASSES = _classes([
    ("background", (255, 255, 255)), ("cloth", (238, 229, 102)), ("ear_r", (250, 150, 50)),
    ("eye_g", (124, 99, 34)), ("hair", (193, 127, 15)), ("hat", (225, 96, 18)), ("l_brow", (220, 147, 77)),
    ("l_ear", (99, 83, 3)), ("l_eye", (116, 116, 138)), ("l_lip", (200, 226, 37)), ("mouth", (225, 184, 161)),
    ("neck", (142, 172, 248)), ("neck_l", (153, 112, 146)), ("nose", (38, 112, 254)), ("r_brow", (229, 30, 141)),
    ("r_ear", (52, 83, 84)), ("r_eye", (194, 87, 125)), ("skin", (248, 213, 42)), ("u_lip", (31, 102, 211)),
])

BUILTIN_CLASSES = {"diffuseseg": DIFFUSESEG_CLASSES, "celebamask_hq": CELEBAMASK_HQ_CLASSES,
                   "celeba19": CELEBA19_CLASSES, "celeba_19": CELEBA19_CLASSES}
# Formats whose folders carry no classes.json but have one fixed class list.
FORMAT_DEFAULT_CLASSES = {"celebamask_hq": "celebamask_hq"}
SYNONYMS = (("background", "bg"), ("neck_l", "necklace"), ("ear_r", "earring"))
BACKGROUND_NAMES = ("background", "bg")


def builtin_classes(name: str) -> ClassList:
    """A built-in class list by name: diffuseseg, celebamask_hq or celeba19 (a fresh copy)."""
    if name not in BUILTIN_CLASSES:
        raise DataError(f"unknown built-in class list {name!r}; choose one of: "
                        f"{', '.join(k for k in BUILTIN_CLASSES if k != 'celeba_19')}, or give a JSON file")
    c = BUILTIN_CLASSES[name]
    return ClassList(list(c.names), c.palette.copy())


def resolve_classes(spec: str, root: str | Path, fmt: str = "index", default: ClassList | None = None) -> ClassList:
    """``labels.classes``: a built-in name, a class-list JSON path, or '' = ``<root>/classes.json``; when that
    file is absent, ``default`` (e.g. the config's list for a folder that carries none), else the built-in
    list of a format with a fixed one (celebamask_hq)."""
    if spec in BUILTIN_CLASSES:
        return builtin_classes(spec)
    if spec:
        return ClassList.read(spec)
    own = Path(root) / "classes.json"
    if own.is_file():
        return ClassList.read(own)
    if default is not None:
        return default
    if fmt in FORMAT_DEFAULT_CLASSES:
        return builtin_classes(FORMAT_DEFAULT_CLASSES[fmt])
    raise DataError(f"class list not found: {own}; name one (labels.classes, or --from in convert_labels.py): "
                    f"a JSON file or one of diffuseseg, celebamask_hq, celeba19")


# ----------------------------------------------------------------------------------------------
# class mapping by name

def _synonyms(name: str) -> list[str]:
    return [other for group in SYNONYMS if name in group for other in group if other != name]


def _background_id(classes: ClassList) -> int | None:
    return next((classes.names.index(n) for n in BACKGROUND_NAMES if n in classes.names), None)


def counterpart(name: str, dst: ClassList) -> tuple[int | None, str]:
    """The id of ``name``'s class in ``dst`` (same name, else a synonym) and how it was found."""
    if name in dst.names:
        return dst.names.index(name), "same name"
    match = next((s for s in _synonyms(name) if s in dst.names), None)
    return (dst.names.index(match), f"synonym ({name} = {match})") if match is not None else (None, "")


def class_mapping(src: ClassList, dst: ClassList, unmapped: str = "ignore") -> tuple[np.ndarray, list[str]]:
    """A lookup table (256,) uint8 from ``src`` ids to ``dst`` ids by class name, and a report table.

    Identical names map; then synonyms (background = bg, neck_l = necklace, ear_r = earring). A source
    class with neither goes to ``unmapped``: "ignore" (255: left out of training and scoring) or
    "background" (``dst``'s background / bg class). Values outside the source ids map to 255.
    """
    if unmapped not in ("ignore", "background"):
        raise DataError(f"unmapped must be 'ignore' or 'background', got {unmapped!r}")
    lut = np.full(256, IGNORE_ID, np.uint8)
    dst_bg = _background_id(dst)
    rows, found, lost = [], {}, []
    for i, name in enumerate(src.names):
        j, note = counterpart(name, dst)
        if j is not None:
            found.setdefault(j, []).append(name)
        elif unmapped == "background":
            if dst_bg is None:
                raise DataError(f"class {name!r} has no counterpart in the target classes, which have no "
                                f"background/bg class: use unmapped=ignore")
            j, note = dst_bg, "NO COUNTERPART -> background"
            lost.append(name)
        else:
            j, note = IGNORE_ID, f"NO COUNTERPART -> ignore ({IGNORE_ID})"
            lost.append(name)
        lut[i] = j
        target = f"{j:>3} {dst.names[j]}" if j < len(dst.names) else f"{j:>3} (ignore)"
        rows.append(f"{i:>3} {name:<14} -> {target:<18} {note}")
    report = [f"{'id':>3} {'source class':<14}    {'target class':<18} how", *rows]
    for j, name in enumerate(dst.names):
        if len(found.get(j, [])) > 1:
            report.append(f"note: {' and '.join(found[j])} both become {name!r}")
        elif j not in found:
            report.append(f"note: target class {name!r} receives no source class")
    report.append(f"unmapped source classes (-> {unmapped}): {', '.join(lost)}" if lost
                  else "every source class has a counterpart")
    return lut, report


# ----------------------------------------------------------------------------------------------
# readers

def _open_mask_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot decode mask {path}: {err}") from None


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from None


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@dataclass
class PaletteDecoder:
    """Exact RGB -> class id through a sorted table of packed colours (vectorised)."""
    classes: ClassList

    def __post_init__(self) -> None:
        codes = _pack(self.classes.palette)
        if len(np.unique(codes)) != len(codes):
            dup = [n for n, c in zip(self.classes.names, codes) if (codes == c).sum() > 1]
            raise DataError(f"the class palette gives the same colour to several classes ({', '.join(dup)}): "
                            f"RGB masks cannot tell them apart")
        self.order = np.argsort(codes)
        self.codes = codes[self.order]

    def __call__(self, rgb: np.ndarray, source: str) -> np.ndarray:
        packed = _pack(rgb)
        pos = np.clip(np.searchsorted(self.codes, packed), 0, len(self.codes) - 1)
        known = self.codes[pos] == packed
        if not known.all():
            bad = np.unique(packed[~known])
            colours = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in bad[:3].tolist())
            raise DataError(f"{source}: {int((~known).sum())} pixels have colours that are not in the class "
                            f"palette ({len(bad)} distinct, e.g. {colours}); palette: "
                            + ", ".join(f"{n}={tuple(int(v) for v in c)}"
                                        for n, c in zip(self.classes.names, self.classes.palette)))
        return self.order[pos].astype(np.uint8)


def palette_pairs(root: Path, classes: ClassList) -> list[Pair]:
    """images/<name>.<png|jpg|jpeg> with masks/<name>.png coloured by the class palette."""
    decode = PaletteDecoder(classes)
    return [Pair(name, image, (lambda p=mask: decode(_open_mask_rgb(p), str(p))), str(mask))
            for name, image, mask in matched_image_mask_files(root)]


CELEBAMASK_IMAGES, CELEBAMASK_ANNO = "CelebA-HQ-img", "CelebAMask-HQ-mask-anno"
_PART_FILE = re.compile(r"^(\d+)_([a-z_]+)$")


def _read_part(path: Path) -> np.ndarray:
    """A binary part mask: on where > 127 (greyscale 0/255 PNGs, sometimes stored as RGB)."""
    return _open_mask_rgb(path).max(axis=-1) > 127


def _celebamask_mask(image_path: Path, parts: dict[str, Path], lut: np.ndarray | None) -> np.ndarray:
    mask = None
    for cid, part in enumerate(CELEBAMASK_HQ_PARTS, start=1):
        if part not in parts:
            continue
        on = _read_part(parts[part])
        if mask is None:
            mask = np.zeros(on.shape, np.uint8)
        elif on.shape != mask.shape:
            raise DataError(f"{parts[part]} is {on.shape[1]}x{on.shape[0]} but the other part masks of "
                            f"{image_path.name} are {mask.shape[1]}x{mask.shape[0]}")
        mask[on] = cid
    if lut is not None:
        mask = lut[mask]
    w, h = _image_size(image_path)
    if mask.shape != (h, w):
        if mask.shape[0] * w != mask.shape[1] * h:
            raise DataError(f"part masks of {image_path} are {mask.shape[1]}x{mask.shape[0]}, not the image's "
                            f"aspect ratio ({w}x{h})")
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return mask


def celebamask_hq_pairs(root: Path, classes: ClassList) -> list[Pair]:
    """The raw CelebAMask-HQ layout (see the module doc); ids follow ``classes`` by name."""
    img_dir, anno_dir = root / CELEBAMASK_IMAGES, root / CELEBAMASK_ANNO
    for d in (img_dir, anno_dir):
        if not d.is_dir():
            raise DataError(f"{root}: not a CelebAMask-HQ folder: {d.name}/ not found "
                            f"(expected {CELEBAMASK_IMAGES}/<k>.jpg and {CELEBAMASK_ANNO}/<k//2000>/<k:05d>_<part>.png)")
    lut = None
    if classes.names != list(CELEBAMASK_HQ_CLASSES.names):
        lut, _ = class_mapping(CELEBAMASK_HQ_CLASSES, classes)
        lost = [n for n in CELEBAMASK_HQ_CLASSES.names if counterpart(n, classes)[0] is None]
        if lost:
            raise DataError(f"CelebAMask-HQ class(es) {', '.join(lost)} have no counterpart in the configured "
                            f"class list ({', '.join(classes.names)}); convert with utils/convert_labels.py")
    images: dict[int, Path] = {}
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        if not p.stem.isdigit():
            raise DataError(f"{p}: CelebA-HQ image names are numbers (<k>.jpg)")
        k = int(p.stem)
        if k in images:
            raise DataError(f"two images for number {k}: {images[k]} and {p}")
        images[k] = p
    if not images:
        raise DataError(f"no .png/.jpg/.jpeg images in {img_dir}")
    parts: dict[int, dict[str, Path]] = {}
    for p in sorted(anno_dir.glob("*/*.png")):
        m = _PART_FILE.match(p.stem)
        if m is None or m.group(2) not in CELEBAMASK_HQ_PARTS:
            raise DataError(f"{p}: expected <k:05d>_<part>.png with part one of {', '.join(CELEBAMASK_HQ_PARTS)}")
        k = int(m.group(1))
        if p.parent.name != str(k // 2000):
            raise DataError(f"{p}: the part masks of image {k} belong in {anno_dir / str(k // 2000)}")
        if k not in images:
            raise DataError(f"part mask {p} has no image {img_dir / f'{k}.jpg'}")
        parts.setdefault(k, {})[m.group(2)] = p
    no_parts = sorted(set(images) - set(parts))
    if no_parts:
        raise DataError(f"{root}: {len(no_parts)} image(s) without any part mask, e.g. {images[no_parts[0]]} "
                        f"(expected {anno_dir / str(no_parts[0] // 2000) / f'{no_parts[0]:05d}_<part>.png'})")
    return [Pair(f"{k:05d}", images[k], (lambda k=k: _celebamask_mask(images[k], parts[k], lut)),
                 f"{anno_dir / str(k // 2000) / f'{k:05d}'}_*.png") for k in sorted(images)]


def _read_npy_mask(path: Path, image_path: Path, num_classes: int) -> np.ndarray:
    try:
        label = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"cannot read label map {path}: {err}") from None
    if not isinstance(label, np.ndarray) or label.dtype.kind not in "ui":
        raise DataError(f"{path}: expected an integer (uint8) label map, found dtype "
                        f"{getattr(label, 'dtype', type(label).__name__)}")
    if label.ndim != 2:
        raise DataError(f"{path}: expected a 2-D (H, W) label map, found shape {label.shape}")
    w, h = _image_size(image_path)
    if label.shape != (h, w):
        raise DataError(f"{path}: label map of shape {label.shape} (H, W) but its image {image_path.name} is "
                        f"{w}x{h}, i.e. ({h}, {w})")
    bad = (label < 0) | (label >= num_classes)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} pixels have class ids outside 0..{num_classes - 1} "
                        f"(min {int(label.min())}, max {int(label.max())})")
    return label.astype(np.uint8)


def ddpm_segmentation_pairs(root: Path, classes: ClassList) -> list[Pair]:
    """<root>/<name>.<png|jpg|jpeg> with a sibling <name>.npy (H, W) label map (official layout)."""
    if not root.is_dir():
        raise DataError(f"labeled data folder not found: {root}")
    images = {p.stem: p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    if not images:
        raise DataError(f"no .png/.jpg/.jpeg images in {root}")
    labels = {p.stem: p for p in root.glob("*.npy")}
    no_label = sorted(set(images) - set(labels))
    if no_label:
        raise DataError(f"{root}: {len(no_label)} image(s) without a .npy label map, e.g. {images[no_label[0]]} "
                        f"(expected {root / (no_label[0] + '.npy')})")
    no_image = sorted(set(labels) - set(images))
    if no_image:
        raise DataError(f"{root}: {len(no_image)} label map(s) without an image, e.g. {labels[no_image[0]]}")
    n = len(classes.names)
    return [Pair(k, images[k], (lambda k=k: _read_npy_mask(labels[k], images[k], n)), str(labels[k]))
            for k in sorted(images)]


READERS: dict[str, Callable[[Path, ClassList], list[Pair]]] = {
    "palette": palette_pairs,
    "celebamask_hq": celebamask_hq_pairs,
    "ddpm_segmentation": ddpm_segmentation_pairs,
}


def pair_readers() -> dict[str, Callable[[Path, ClassList], list[Pair]]]:
    """Label formats by config name (labels.format), the native ``index`` layout first."""
    return {"index": index_pairs, **READERS}


# ----------------------------------------------------------------------------------------------
# conversion to the native layout

def convert_labeled_folder(src: str | Path, dst: str | Path, fmt: str, src_classes: ClassList,
                           dst_classes: ClassList, unmapped: str = "ignore", size: int = 0,
                           limit: int = 0, chunk: int = 32,
                           progress: Callable[[int, int], None] | None = None) -> dict:
    """Read ``src`` (format ``fmt``, classes ``src_classes``), map every mask to ``dst_classes`` by name
    and write the native index layout under ``dst`` (every file atomically). ``size`` > 0 resizes and
    centre-crops to size x size (smooth for images, nearest for masks); 0 keeps the mask's image size.
    Returns {"images", "unmapped_pixels", "report"}."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise DataError("the output folder must differ from the input folder")
    readers = pair_readers()
    if fmt not in readers:
        raise DataError(f"unknown label format {fmt!r}; available: {', '.join(readers)}")
    lut, report = class_mapping(src_classes, dst_classes, unmapped)
    pairs = readers[fmt](src, src_classes)
    if limit:
        pairs = pairs[:limit]
    lost_ids = [i for i, n in enumerate(src_classes.names) if counterpart(n, dst_classes)[0] is None]
    unmapped_pixels = 0
    for lo in range(0, len(pairs), chunk):
        names, images, masks = [], [], []
        for pair in pairs[lo:lo + chunk]:
            image, mask = open_rgb(pair.image_path), pair.read_mask()
            if mask.shape != (image.height, image.width):
                raise DataError(f"mask {pair.mask_source} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                f"{pair.image_path} is {image.width}x{image.height}")
            if size:
                image = resize_center_crop(image, size)
                mask = np.asarray(resize_center_crop(Image.fromarray(mask), size, Image.NEAREST))
            if lost_ids:
                unmapped_pixels += int(np.isin(mask, lost_ids).sum())
            names.append(pair.name)
            images.append(np.asarray(image))
            masks.append(lut[mask])
        write_labeled_set(dst, names, images, masks, dst_classes)
        if progress:
            progress(min(lo + chunk, len(pairs)), len(pairs))
    return {"images": len(pairs), "unmapped_pixels": unmapped_pixels, "report": report}
