"""The one configuration: typed sections, loading, ``--set`` overrides, validation, saving.

The schema lives here as dataclasses (their defaults equal the shipped ``config.yaml``; a test keeps
the two in step). A YAML file only needs the keys it changes. Unknown sections or keys, wrong types
and out-of-range values raise ``ConfigError`` naming the key and what is allowed, before any work.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from diffuseseg.errors import UserError
from diffuseseg.io import atomic_write_text


class ConfigError(UserError):
    """A config file or override is invalid."""


def opt(default: Any, help: str = "", *, choices: Iterable[Any] | None = None,
        min: float | None = None, max: float | None = None) -> Any:
    """A config field with its documentation and allowed values."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    seed: int = opt(0, "global seed (model init, data order, noise)")
    device: str = opt("auto", "auto = cuda when available, else cpu", choices=("auto", "cpu", "cuda"))
    threads: int = opt(0, "torch CPU threads; 0 = PyTorch's default (all cores)", min=0)
    keep_freed_memory: bool = opt(True, "keep freed memory for the process's next allocations instead of handing "
                                        "it back (glibc; each tensor over 32 MB is otherwise mapped and faulted in "
                                        "anew: the read-out of photos runs ~1.4x faster); the process then holds "
                                        "its peak memory")
    checkpoint: str = opt("checkpoints/toy_faces_32/ema_fp16.pt",
                          "trained DDPM used by sampling, features, segmentation and generation")
    use_ema: bool = opt(True, "use the EMA weights when the checkpoint has both")
    compile_backend: str = opt("inductor", "torch.compile backend of every *.compile key; aot_eager traces the graphs "
                                           "without generating kernels (a quick check that a model compiles)")


@dataclass
class DataConfig:
    source: str = opt("toy_faces", "DDPM training images: embedded toy faces drawn on the fly, or a folder",
                      choices=("toy_faces", "folder"))
    root: str = opt("data/toy_faces", "root of the labeled splits (and of the images when source=folder)")
    extra_roots: list[str] = opt([], "more DDPM training folders for source=folder, each PATH or PATH[start:stop] "
                                     "(positions in its files sorted by name); their images join data.root's")
    toy_seed: int = opt(0, "seed of the toy-faces renderer (faces are deterministic by seed and index)")
    train_indices: list[int] = opt([0, 1_000_000], "[start, stop) toy-face indices for DDPM training")
    labeled_indices: list[int] = opt([1_000_000, 1_000_100], "[start, stop) toy-face indices of the labeled pool")
    val_indices: list[int] = opt([1_000_100, 1_000_200], "[start, stop) toy-face indices for validation")
    test_indices: list[int] = opt([1_000_200, 1_000_500], "[start, stop) toy-face indices for testing")
    hflip: bool = opt(True, "random horizontal flips when training the DDPM")
    on_bad_image: str = opt("fail", "an image that cannot be decoded: stop, or skip it with a warning",
                            choices=("fail", "skip"))
    num_workers: int = opt(0, "DataLoader worker processes that load (folder) or render (toy_faces) training "
                              "batches; set it on a GPU", min=0)


@dataclass
class ModelConfig:
    """DiffuseSeg's U-Net keys, plus ``attention``, ``dropout`` and ``out_block_channels``; or a pretrained
    diffusers UNet2DModel (``backbone``)."""
    backbone: str = opt("native", "the U-Net: this project's (the keys below), or a diffusers UNet2DModel at "
                                  "run.checkpoint: a folder (model or pipeline layout) or a Hugging Face hub id ORG/NAME "
                                  "(from the HF cache; HF_HUB_OFFLINE is honoured); its config.json defines the network, "
                                  "its scheduler config the diffusion schedule; im_size and im_channels must match it",
                        choices=("native", "diffusers"))
    im_channels: int = opt(3, "image channels", min=1)
    im_size: int = opt(32, "image side in pixels (data are resized and centre-cropped to it)", min=8)
    down_channels: list[int] = opt([32, 64, 96, 96], "channels per level")
    mid_channels: list[int] = opt([96, 96, 96], "mid blocks: [down[-1], ..., down[-2]]")
    down_sample: list[bool] = opt([True, True, True], "halve the resolution after each down level")
    attention: list[bool] = opt([False, True, True], "self-attention per level (DiffuseSeg: all True)")
    time_emb_dim: int = opt(128, "timestep embedding size", min=2)
    num_down_layers: int = opt(2, "ResNet layers per down block", min=1)
    num_mid_layers: int = opt(1, "attention+ResNet pairs per mid block", min=1)
    num_up_layers: int = opt(2, "ResNet layers per up block", min=1)
    num_heads: int = opt(4, "attention heads", min=1)
    dropout: float = opt(0.0, "dropout inside ResNet layers", min=0.0, max=0.9)
    out_block_channels: int = opt(16, "channels of the last up block (DiffuseSeg: 16)", min=8)


GROUPS = 8  # GroupNorm groups of the native U-Net (DiffuseSeg always uses 8)


def validate_model_config(cfg: ModelConfig) -> None:
    """DiffuseSeg's structural constraints, with messages naming the offending keys."""
    down, mid = cfg.down_channels, cfg.mid_channels
    problems = []
    if len(down) < 2:
        problems.append(f"model.down_channels needs at least 2 entries, got {down}")
    if len(mid) < 2:
        problems.append(f"model.mid_channels needs at least 2 entries, got {mid}")
    if len(down) >= 2 and len(mid) >= 2:
        if mid[0] != down[-1]:
            problems.append(f"model.mid_channels[0]={mid[0]} must equal model.down_channels[-1]={down[-1]}")
        if mid[-1] != down[-2]:
            problems.append(f"model.mid_channels[-1]={mid[-1]} must equal model.down_channels[-2]={down[-2]}")
    for key in ("down_sample", "attention"):
        value = getattr(cfg, key)
        if len(value) != len(down) - 1:
            problems.append(f"model.{key} needs len(down_channels)-1={len(down) - 1} entries, got {value}")
    channels = list(down) + list(mid) + [cfg.out_block_channels]
    if any(c % GROUPS for c in channels):
        problems.append(f"every channel count must be divisible by {GROUPS} (GroupNorm groups), got {channels}")
    if cfg.time_emb_dim % 2:
        problems.append(f"model.time_emb_dim must be even, got {cfg.time_emb_dim}")
    n_down = sum(cfg.down_sample)
    if cfg.im_size % (2 ** n_down):
        problems.append(f"model.im_size={cfg.im_size} must be divisible by 2**{n_down} (down-sampling levels)")
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = opt(1000, "T", min=2)
    beta_schedule: str = opt("linear", "β schedule", choices=("linear", "cosine"))
    beta_start: float = opt(1e-4, "first β (linear)", min=0.0, max=1.0)
    beta_end: float = opt(0.02, "last β (linear)", min=0.0, max=1.0)
    prediction_type: str = opt("epsilon", "what the U-Net predicts", choices=("epsilon", "v_prediction"))
    loss_weighting: str = opt("none", "per-timestep loss weights", choices=("none", "min_snr"))
    min_snr_gamma: float = opt(5.0, "γ of Min-SNR weighting", min=0.0)
    clip_sample: bool = opt(True, "clip predicted x0 to [-1, 1] while sampling")


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


@dataclass
class TrainConfig:
    out_dir: str = opt("runs/ddpm", "run folder: checkpoints, log, sample grids, resolved config")
    batch_size: int = opt(32, "images per step", min=1)
    lr: float = opt(3e-4, "AdamW learning rate", min=0.0)
    warmup_steps: int = opt(200, "linear learning-rate warmup", min=0)
    lr_schedule: str = opt("constant", "after warmup: constant, or cosine decay to lr * lr_min_ratio over the run "
                                       "(the run's length is max_steps or time_budget_min, whichever ends it "
                                       "first); constant won the 8-minute recipe study (toy val mIoU 0.471 vs "
                                       "0.452, docs/training_recipes.md)",
                           choices=("constant", "cosine"))
    lr_min_ratio: float = opt(0.05, "final learning rate of the cosine schedule as a fraction of lr", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = opt(1.0, "gradient-norm clip; 0 = off", min=0.0)
    ema_decay: float = opt(0.999, "EMA decay (after warmup)", min=0.0, max=1.0)
    ema_warmup: bool = opt(True, "EMA decay min(ema_decay, (1+step)/(10+step)) so early EMA tracks the model")
    max_steps: int = opt(20000, "stop after this many optimizer steps", min=1)
    time_budget_min: float = opt(0.0, "also stop after this many wall-clock minutes; 0 = no limit", min=0.0)
    log_every: int = opt(50, "steps between log lines (train_log.jsonl)", min=1)
    sample_every: int = opt(1000, "steps between sample grids; 0 = never", min=0)
    sample_images: int = opt(16, "images in each sample grid", min=1)
    sample_steps: int = opt(50, "DDIM steps for the sample grids", min=1)
    ckpt_every: int = opt(500, "steps between checkpoints", min=1)
    snapshot_every_min: float = opt(0.0, "also keep the EMA weights every this many training minutes as "
                                         "snapshots/ema_fp16_min<M>.pt (quality-against-time curves); 0 = never",
                                    min=0.0)
    init_weights: str = opt("", "start a new run from these U-Net weights (ours or DiffuseSeg's .pth) with a "
                                "fresh optimizer; '' = random init")
    mixed_precision: str = opt("auto", "auto = bf16 on CUDA, fp32 on CPU (bf16 is ~10x slower there)",
                               choices=("auto", "no", "bf16", "fp16"))
    channels_last: bool = opt(False, "channels-last memory format (can help on GPU)")
    compile: str = opt("none", "torch.compile the training step's U-Net in this mode; none = eager. Eager by default: "
                               "on CPU it gained 1.00-1.07x after 1.5-3 minutes of compiling per process "
                               "(docs/performance.md); on GPU try reduce-overhead. Weights and checkpoints are the "
                               "same compiled or not, so --resume works across the two",
                       choices=COMPILE_MODES)
    max_bad_steps: int = opt(10, "consecutive steps with a NaN/inf loss or gradient (each skipped: weights, EMA "
                                 "and checkpoints untouched) before the run stops with an error; 0 = at the first",
                             min=0)


@dataclass
class SampleConfig:
    out_dir: str = opt("runs/samples", "where numbered PNGs, the grid and the resolved config go")
    num_images: int = opt(64, "images to sample", min=1)
    batch_size: int = opt(64, "images per batch", min=1)
    sampler: str = opt("ddim", "sampler", choices=("ddpm", "ddim"))
    steps: int = opt(100, "DDIM steps (DDPM uses every training timestep unless set lower)", min=1)
    eta: float = opt(0.0, "DDIM η: 0 deterministic, 1 ≈ DDPM", min=0.0, max=1.0)
    timestep_spacing: str = opt("trailing", "DDIM timestep spacing", choices=("leading", "trailing", "linspace"))
    seed: int = opt(0, "sampling seed: the same seed gives the same images")
    trajectory: bool = opt(False, "also write trajectory.gif: the first batch's grid after every sampler step "
                                  "(noise -> images)")
    judge: str = opt("", "face judge: a face parser (train_segmenter.py's segmenter.pt) that scores samples against "
                         "held-out real faces in its features, beside the critic (docs/sample_quality.md); '' = none")


@dataclass
class LabelsConfig:
    """Labeled data for segmentation: fixed, disjoint image-level splits."""
    format: str = opt("index", "mask format", choices=("index", "palette", "celebamask_hq", "ddpm_segmentation"))
    classes: str = opt("", "class list: JSON (names + palette) or a built-in name (diffuseseg | "
                                 "celebamask_hq | celeba19); '' = <dir>/classes.json")
    labeled_dir: str = opt("data/toy_faces/labeled", "folder of the labeled training pool")
    labeled_range: list[int] = opt([0, 100], "[start, stop) positions (sorted by name) of the labeled pool")
    labeled_extra: list[str] = opt([], "more labeled folders whose pairs join the pool after labeled_dir's range, each "
                                       "DIR or DIR[start:stop] (positions sorted by name); never a val or test image")
    num_labeled: int = opt(20, "labeled images the ensemble is trained on (the first of the pool)", min=1)
    val_dir: str = opt("data/toy_faces/val", "validation images (for tuning; never the test set)")
    val_range: list[int] = opt([0, 100], "[start, stop) positions of the validation split")
    test_dir: str = opt("data/toy_faces/test", "test images with ground-truth masks")
    test_range: list[int] = opt([0, 300], "[start, stop) positions of the test split")
    min_pixels: int = opt(20, "in training masks, a class with fewer pixels (counted at 256x256, "
                                    "scaled by area) in an image becomes ignore", min=0)
    ignore_index: int = opt(255, "label value that is ignored in training and evaluation", min=0, max=255)


@dataclass
class FeaturesConfig:
    timesteps: list[int] = opt([5, 30, 100], "diffusion steps whose U-Net activations form the features (the "
                                             "paper's 50, 150, 250 read worse on 32 px toy faces: docs/results.md)")
    blocks: list[str] = opt(["ups.0", "ups.1", "ups.2"], "U-Net blocks to read (downs.i, mids.j, ups.k), "
                            "concatenated in the order listed; the official code uses the U-Net's order: list them in "
                            "that order to match")
    noise: str = opt("shared", "one noise tensor for all images (official), or one per image",
                     choices=("shared", "per_image"))
    noise_seed: int = opt(0, "seed of the feature noise")
    batch_size: int = opt(16, "images per feature-extraction batch", min=1)
    store_dir: str = opt("runs/features", "where extract_features.py writes the fp16 feature store")
    compile: str = opt("none", "torch.compile the U-Net's feature pass in this mode; none = eager (the default: on CPU "
                               "it gained 1.02-1.25x after 40-90 s of compiling per process, which pays back only past "
                               "about 500 images: docs/performance.md)", choices=COMPILE_MODES)
    label_size: int = opt(0, "side of the per-pixel feature maps the read-out trains on and predicts at; 0 = "
                             "model.im_size (official). Lower it for large images (256 px at 64: 1/16 of the rows, "
                             "memory and store): training masks are resized to it (nearest), predicted masks back "
                             "to the image size", min=0)
    ram_limit_mb: float = opt(2048, "feature maps above this many megabytes (a conv-head fit's labeled images in every "
                                    "view, a study's pool, evaluation or unlabeled images) are memory-mapped from "
                                    "files under store_dir while used instead of held in RAM", min=0)


@dataclass
class EnsembleConfig:
    readout: str = opt("conv_head", "what reads the frozen features: small convolutional heads on the feature "
                                    "maps (neighbours too; section conv_head; toy val 0.505 vs 0.475 at 20 labels), or "
                                    "the official pixel-MLP ensemble (each pixel alone) (official: pixel_mlp)",
                       choices=("pixel_mlp", "conv_head"))
    members: int = opt(10, "pixel MLPs in the ensemble", min=1)
    hidden: list[int] = opt([], "hidden sizes [h1, h2] of each pixel MLP; [] = official: [256, 128] for >= 30 "
                                "classes, else [128, 32]")
    layer_order: str = opt("official", "Linear-ReLU-BN (official) or Linear-BN-ReLU (DiffuseSeg)",
                           choices=("official", "diffuseseg"))
    init: str = opt("official", "weight init: N(0, 0.02) as the official code, or PyTorch's default",
                    choices=("official", "pytorch"))
    lr: float = opt(1e-3, "Adam learning rate", min=0.0)
    batch_size: int = opt(64, "pixels per member per step", min=1)
    drop_last: bool = opt(True, "skip the last partial mini-batch of every epoch, so an epoch is N // batch_size "
                                "steps (official: the last partial batch of an epoch is skipped; it is never trained "
                                "on nor counted by the stopping rule)")
    patience: int = opt(50, "official stopping rule: stop a member after this many mini-batches without "
                            "a new best loss (counted from epoch 4)", min=1)
    min_steps: int = opt(6000, "start the stopping rule only after this many steps (small labeled sets; "
                               "tuned on toy val; official: 0)", min=0)
    max_epochs: int = opt(100, "upper bound on epochs (training also stops when the loss stops improving)", min=1)
    class_balanced: bool = opt(True, "sample pixels inversely to their class frequency (tuned on toy val; "
                                     "official: false)")
    train_views: str = opt("flip", "views of each labeled image the read-out trains on: itself, + its mirror (l_/r_ "
                                   "classes swapped), or mirrors x 1-px shifts (10 views), or mirrors x each side a "
                                   "quarter covered in grey (flip_cut, 10 views: faces cut by a photo's edge), or "
                                   "mirrors x turned 3 degrees or scaled 5 % either way (flip_turn, 10 views: aligned "
                                   "crops a little off) (tuned on toy val; official: none)",
                           choices=("none", "flip", "flip_shift", "flip_cut", "flip_turn"))
    test_views: str = opt("flip", "views each member's softmax is averaged over when predicting (test-time "
                                  "augmentation; features are extracted once per view) (tuned on toy val; official: "
                                  "none)", choices=("none", "flip", "flip_shift"))
    vote: str = opt("majority", "per-pixel label: majority vote (official) or argmax of the mean softmax",
                    choices=("majority", "mean_softmax"))
    seed: int = opt(0, "seed of member initialisation and sample order")
    path: str = opt("runs/ensemble/ensemble.pt", "ensemble file written by train_mlps.py, read by segment.py; "
                    "or a folder of DiffuseSeg mlp_<k>_best.pt files (classes from labels.classes)")


@dataclass
class ConvHeadConfig:
    """The convolutional read-out (ensemble.readout=conv_head): heads trained together on feature maps."""
    members: int = opt(3, "heads (their disagreement is the uncertainty, as for the MLPs)", min=1)
    hidden: int = opt(64, "channels per head (a multiple of 8)", min=8)
    steps: int = opt(1500, "AdamW steps", min=1)
    batch_size: int = opt(8, "feature maps per step", min=1)
    lr: float = opt(1e-3, "AdamW peak learning rate (warm-up, then cosine decay)", min=0.0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", min=0.0)
    shift: int = opt(4, "random shifts of up to this many pixels while training (toy val: 4 beat 2 at 5 and 10 "
                        "labels, tied at 20)", min=0)
    crop: int = opt(0, "train on random windows of this side of the feature maps (the heads are fully convolutional: "
                       "a 32 px window of a 64 px map costs a quarter); 0 = whole maps", min=0)
    compile: str = opt("none", "torch.compile the heads' training step in this mode; none = eager (the default: on CPU "
                               "compiled heads gained nothing above the noise of a shared machine: docs/performance.md)", choices=COMPILE_MODES)


@dataclass
class SegmentConfig:
    input_dir: str = opt("", "images to segment; '' = labels.test_dir (with ground truth). Their masks, colour "
                             "masks and overlays come at each image's own size")
    crop: str = opt("center", "how an input_dir image becomes the model's square input: center scales the shorter "
                              "side to model.im_size and cuts off the longer side's ends (their pixels are written "
                              "as labels.ignore_index and shown hatched), pad scales the longer side to it and fills "
                              "the rest with mid grey (the whole image is segmented)", choices=("center", "pad"))
    align: str = opt("auto", "input_dir photos: auto = find every face, align it as the training faces are framed, "
                             "segment it and paste its mask back (a face already framed so keeps segment.crop's "
                             "framing; faces.json lists each face); none = segment.crop's framing only. The labeled "
                             "test split is always read as it is", choices=("auto", "none"))
    finder: str = opt("readout", "what finds the faces for align=auto: 'readout' (the read-out's own mask of the "
                                 "padded photo) or a face parser .pt (utils/face_finder.py, train_segmenter.py) "
                                 "whose classes name eyes, nose, mouth and skin")
    framing: str = opt("", "the training faces' landmark positions for align=auto: a JSON written by "
                           "utils/face_finder.py --framing, or '' = measured at start on the labels.labeled_dir "
                           "masks")
    refine: int = opt(1, "align=auto: times each face is parsed again in its aligned crop and its transform refit",
                      min=0)
    snap_sd: float = opt(3.0, "align=auto: a lone face whose pose (scale, tilt, centre) lies within this many of the "
                              "training faces' standard deviations of the plain framing keeps it (segmented as "
                              "without alignment); 0 = every face is warped", min=0.0)
    snap_plain_sd: float = opt(6.0, "align=auto: a lone face also keeps the plain framing where the refiner, parsing "
                                    "that framing itself, finds all its landmarks at the training faces' scale "
                                    "(within snap_sd) and within this many standard deviations of their tilt and "
                                    "centre (a second opinion for faces whose aligned fit strays: 6 chosen on val and "
                                    "1000 extra faces, docs/real_faces.md); 0 = off", min=0.0)
    refiner: str = opt("", "align=auto: what parses each aligned crop for refine: '' = the finder, 'readout', or a "
                           "face parser .pt (one trained on aligned faces places the landmarks more precisely)")
    out_dir: str = opt("runs/segment", "masks, colourised masks, overlays, metrics.json")
    save_overlays: bool = opt(True, "also write colourised masks and overlays")


@dataclass
class GenerateConfig:
    """The labeled-data factory: sample images, segment them, keep a manifest."""
    out_dir: str = opt("runs/synthetic", "images/, masks/, previews/, manifest.jsonl, filtered/")
    num_images: int = opt(200, "(image, mask) pairs to generate", min=1)
    sampler: str = opt("ddim", "sampler", choices=("ddpm", "ddim"))
    steps: int = opt(50, "sampling steps (DDIM)", min=1)
    eta: float = opt(0.0, "DDIM η", min=0.0, max=1.0)
    batch_size: int = opt(32, "images per batch", min=1)
    seed: int = opt(1, "sampling seed (pair i is a pure function of seed and i)")
    filter_fraction: float = opt(0.1, "fraction of the pairs that filter_rule leaves out of the filtered view "
                                      "(official: 0.1, with filter_rule=official)", min=0.0, max=0.99)
    filter_rule: str = opt("drop_most_uncertain", "filtered view: drop_most_uncertain drops the round(fraction*N) "
                                                  "most uncertain pairs (this project's rule); official keeps the "
                                                  "official train_deeplab.py slice argsort(uncertainty)[30 : N - "
                                                  "int(fraction*N) + 30], i.e. drops the 30 least uncertain and the "
                                                  "int(fraction*N) - 30 most uncertain (needs int(fraction*N) > 30). "
                                                  "Ties in the (6-decimal) scores: stable order by (uncertainty, id)",
                           choices=("drop_most_uncertain", "official"))
    save_previews: bool = opt(True, "also write colourised mask previews")


# The official train_deeplab.py always leaves out the 30 least uncertain generated pairs as well.
OFFICIAL_FILTER_SKIP = 30


def official_filter_range(n: int, fraction: float) -> tuple[int, int]:
    """[start, stop) of the pairs sorted by ascending uncertainty that generate.filter_rule=official keeps:
    the official ``idxs[30 : -int(n * fraction) + 30]``. That slice is only what it means when
    int(n * fraction) > 30 (otherwise it is empty, or wraps), so smaller cases raise UserError."""
    drop = int(n * fraction)  # same float product and truncation as the official script
    if drop <= OFFICIAL_FILTER_SKIP:
        raise UserError(f"filter_rule official with N={n} pairs and fraction {fraction}: the official slice "
                        f"[{OFFICIAL_FILTER_SKIP} : -int(N*fraction) + {OFFICIAL_FILTER_SKIP}] = "
                        f"[{OFFICIAL_FILTER_SKIP} : {OFFICIAL_FILTER_SKIP - drop}] needs int(N*fraction) > "
                        f"{OFFICIAL_FILTER_SKIP}, got {drop}; generate more pairs, raise the fraction or use "
                        f"drop_most_uncertain")
    return OFFICIAL_FILTER_SKIP, n - drop + OFFICIAL_FILTER_SKIP


@dataclass
class SegmenterConfig:
    """The downstream segmenter (train_segmenter.py): a plain network trained on labeled pairs."""
    arch: str = opt("unet", "compact U-Net, or torchvision's LR-ASPP MobileNetV3 (random init; coarse and "
                            "slower at 32-64 px)", choices=("unet", "lraspp"))
    base_channels: int = opt(16, "U-Net channels at full resolution, doubled per level", min=4)
    levels: int = opt(3, "U-Net resolutions; model.im_size must be divisible by 2**(levels-1)", min=2)
    steps: int = opt(3000, "optimizer steps", min=1)
    batch_size: int = opt(8, "pairs per step (also the prediction batch)", min=1)
    lr: float = opt(1e-2, "AdamW peak learning rate (linear warm-up, then cosine decay to 0)", min=0.0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", min=0.0)
    warmup_steps: int = opt(50, "linear learning-rate warm-up steps", min=0)
    hflip: bool = opt(True, "random horizontal flips that swap l_/r_ classes (off by itself when a sided "
                            "class has no partner)")
    scale_jitter: float = opt(0.1, "random zoom in [1/(1+j), 1+j]; pixels from outside the image are ignored",
                              min=0.0, max=1.0)
    shift_jitter: float = opt(0.1, "random shift up to this fraction of the half-width", min=0.0, max=1.0)
    seed: int = opt(0, "seed of initialisation, batch order and augmentation")
    compile: str = opt("auto", "torch.compile the segmenter's training step in this mode; none = eager; auto = "
                               "mode default on a CPU with a C++ compiler for runs of 1500 steps or more, else eager "
                               "(on CPU compiled steps ran 1.5-2.1x faster after 30-60 s of compiling, which pays "
                               "back past about 1200 steps; unmeasured on GPU: docs/performance.md)",
                       choices=("auto", *COMPILE_MODES))
    out_dir: str = opt("runs/segmenter", "segmenter.pt, metrics.json, summary.json, config.yaml")


@dataclass
class StudentConfig:
    """The teacher-student step (train_student.py, study kind 'student'): a teacher trained on the few labels
    labels unlabeled images; the segmenter of section segmenter learns from those and the real labels."""
    teacher: str = opt("ddpm", "what labels the unlabeled images: the DDPM read-out alone, or it averaged with a "
                               "segmenter trained on the same labels (the study's 'fused'); toy val, one draw: students "
                               "0.498 vs 0.451 at 5 labels, 0.617 vs 0.625 at 20", choices=("ddpm", "fused"))
    unlabeled: int = opt(1000, "unlabeled images the teacher labels: the first of the DDPM's training images "
                               "(data.source) that are neither labeled-pool nor evaluation images; 0 = all of them",
                         min=0)
    confidence: float = opt(0.6, "teacher pixels whose top class probability is below this become ignore",
                            min=0.0, max=1.0)
    real_fraction: float = opt(0.25, "share of the student's training images that are real labeled ones (they are "
                                     "repeated to reach it; 0 = each once)", min=0.0, max=0.95)
    steps: int = opt(3000, "student optimizer steps (the other hyper-parameters are section segmenter's)", min=1)
    base_channels: int = opt(32, "the student U-Net's channels at full resolution (section segmenter's "
                                 "base_channels is the supervised baseline's)", min=4)
    rounds: int = opt(2, "students in a row: each after the first learns from its predecessor's confident "
                         "pixels on the same unlabeled images (relabel and repeat)", min=1)
    out_dir: str = opt("runs/student", "student.pt, metrics.json, pseudo_labels.png, config.yaml")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    conv_head: ConvHeadConfig = field(default_factory=ConvHeadConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    student: StudentConfig = field(default_factory=StudentConfig)


# ----------------------------------------------------------------------------------------------
# loading and validation

def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if not typing.get_args(tp) else str(tp).replace("typing.", "")


def _check_value(key: str, tp: Any, value: Any, meta: dict) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float only), or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item_tp.__name__}, got {value!r}")
        return [_check_value(f"{key}[{i}]", item_tp, v, {}) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (isinstance(value, tp) and not (tp is int and isinstance(value, bool))
          or tp is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    value = tp(value)
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {allowed}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: {value!r} is below the minimum {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}: {value!r} is above the maximum {meta['max']}")
    return value


def _fields(section_type: type) -> dict[str, tuple[Any, dict]]:
    hints = typing.get_type_hints(section_type)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(section_type)}


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a validated Config from a nested dict; missing keys take the defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    sections = _sections()
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {list(sections)}")
    built = {}
    for name, section_type in sections.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{name}' must be a mapping, got {values!r}")
        schema = _fields(section_type)
        unknown = set(values) - set(schema)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {sorted(f'{name}.{k}' for k in unknown)}; "
                              f"'{name}' has: {', '.join(schema)}")
        checked = {k: _check_value(f"{name}.{k}", schema[k][0], v, schema[k][1]) for k, v in values.items()}
        built[name] = section_type(**checked)
    cfg = Config(**built)
    _check_relations(cfg)
    return cfg


def _check_relations(cfg: Config) -> None:
    """Constraints that span keys."""
    d = cfg.data
    ranges = {k: getattr(d, k) for k in ("train_indices", "labeled_indices", "val_indices", "test_indices")}
    for key, r in ranges.items():
        if len(r) != 2 or r[0] >= r[1]:
            raise ConfigError(f"data.{key}: expected [start, stop) with start < stop, got {r}")
    items = sorted(ranges.items(), key=lambda kv: kv[1][0])
    for (ka, ra), (kb, rb) in zip(items, items[1:]):
        if ra[1] > rb[0]:
            raise ConfigError(f"data.{ka} {ra} overlaps data.{kb} {rb}: splits must be disjoint")
    lab = cfg.labels
    for key in ("labeled_range", "val_range", "test_range"):
        r = getattr(lab, key)
        if len(r) != 2 or r[0] < 0 or r[0] >= r[1]:
            raise ConfigError(f"labels.{key}: expected [start, stop) with 0 <= start < stop, got {r}")
    splits = [("labeled", lab.labeled_dir, lab.labeled_range), ("val", lab.val_dir, lab.val_range),
              ("test", lab.test_dir, lab.test_range)]
    for i, (na, da, ra) in enumerate(splits):
        for nb, db, rb in splits[i + 1:]:
            if Path(da) == Path(db) and ra[0] < rb[1] and rb[0] < ra[1]:
                raise ConfigError(f"labels.{na}_range {ra} and labels.{nb}_range {rb} overlap in the same "
                                  f"folder {da}: training and test images must never overlap")
    if lab.num_labeled > lab.labeled_range[1] - lab.labeled_range[0]:
        raise ConfigError(f"labels.num_labeled={lab.num_labeled} exceeds the labeled pool {lab.labeled_range}")
    if cfg.features.label_size > cfg.model.im_size:
        raise ConfigError(f"features.label_size={cfg.features.label_size} exceeds model.im_size="
                          f"{cfg.model.im_size}: the read-out cannot be finer than the image")
    bad_t = [t for t in cfg.features.timesteps if not 0 <= t < cfg.diffusion.num_train_timesteps]
    if bad_t or not cfg.features.timesteps:
        raise ConfigError(f"features.timesteps must be a non-empty list in [0, "
                          f"{cfg.diffusion.num_train_timesteps - 1}], got {cfg.features.timesteps}")
    hidden = cfg.ensemble.hidden
    if hidden and (len(hidden) != 2 or min(hidden) < 1):
        raise ConfigError(f"ensemble.hidden: expected [] (official sizes) or two positive ints [h1, h2], got {hidden}")
    g = cfg.generate
    if g.filter_rule == "official" and g.filter_fraction > 0:
        try:  # fail before generating anything, not when the view is built at the end
            official_filter_range(g.num_images, g.filter_fraction)
        except UserError as err:
            raise ConfigError(f"generate.filter_rule / generate.num_images: {err}") from None
    if cfg.diffusion.beta_schedule == "linear" and cfg.diffusion.beta_start >= cfg.diffusion.beta_end:
        raise ConfigError("diffusion.beta_start must be below diffusion.beta_end")
    try:
        validate_model_config(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, YAML-parsed value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.lr=1e-4")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def load_config(path: str | Path | None = "config.yaml", overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (None = defaults only), apply ``section.key=value`` overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    sections = _sections()
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in sections:
            raise ConfigError(f"--set {text!r}: unknown section '{section}'; known: {list(sections)}")
        schema = _fields(sections[section])
        if key not in schema:
            raise ConfigError(f"--set {text!r}: unknown key '{section}.{key}'; '{section}' has: {', '.join(schema)}")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value
    return config_from_dict(raw, source)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config (atomically) next to an output."""
    return atomic_write_text(Path(path), dump_config(cfg))


def diff_sections(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts, as 'key: a != b' lines."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_sections(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return out


def documented_yaml(cfg: Config | None = None) -> str:
    """The config as YAML with each key's help and allowed values as comments (config.yaml's source)."""
    cfg = cfg or Config()
    lines = []
    for section in dataclasses.fields(Config):
        obj = getattr(cfg, section.name)
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(obj):
            value = yaml.safe_dump(getattr(obj, f.name), default_flow_style=True, width=200).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            note = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                note += f" [{' | '.join(map(str, f.metadata['choices']))}]"
            lines.append(f"  {f.name}: {value}" + (f"  # {note}" if note else ""))
        lines.append("")
    return "\n".join(lines)
