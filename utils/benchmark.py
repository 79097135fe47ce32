"""Print speed figures: DDPM training and sampling throughput, achieved GFLOP/s against a measured
fp32 peak (the best of several GEMM and convolution shapes; the toy, the real-face 64 px and DiffuseSeg's 64 px models); segmentation: feature extraction
img/s, ensemble epoch vs the same MLPs trained one after another, segmentation img/s; store: peak RSS
of extract_features.py for 20 vs 200 images; generation: pairs/s split by stage; data: training images/s
the DDPM's batch stream delivers (toy faces are rendered on the fly), with 0 and data.num_workers workers.

Examples:
  python utils/benchmark.py                        # everything, this machine's default device
  python utils/benchmark.py --parts ddpm --models default --steps 10
  python utils/benchmark.py --parts segmentation store generation
  python utils/benchmark.py --set run.device=cuda --set train.mixed_precision=bf16
  python utils/benchmark.py --parts ddpm --set train.compile=default    # eager and compiled training, one run
  python utils/benchmark.py --parts celebahq256         # 256 px diffusers backbone: store RSS for 10 vs 40 images
  python utils/benchmark.py --parts data --set data.num_workers=14   # can the stream keep a GPU fed?
  python utils/benchmark.py --config configs/celebamask_hq64.yaml --parts readout   # where a 64 px read-out fit goes
  python utils/benchmark.py --config configs/celebamask_hq64.yaml --parts segmenter   # segmenter steps, eager and compiled
  python utils/benchmark.py --config configs/celebamask_hq64.yaml --parts photos   # segment.py's photo path
  python utils/benchmark.py --parts windows   # what a conv-head fit reads from features on disk

Figures are medians over timed steps after warm-up. FLOPs are counted with
torch.utils.flop_counter (a multiply-add = 2 FLOPs) on the real forward/backward.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import numpy as np
import torch

from diffuseseg.cli import config_from_args, config_parser, run_main
from diffuseseg.config import Config, load_config
from diffuseseg.datasets import labeled_split, to_model_range
from diffuseseg.flops import flop_counter, median_seconds, peak_gflops, sync, training_flops_per_image
from diffuseseg.diffusion import diffusion_loss
from diffuseseg.runtime import autocast, autocast_dtype, configure_run, maybe_compile, resolve_device
from diffuseseg.sampling import make_sampler, schedule_from_config
from diffuseseg.unet import UNet, count_parameters, model_config_from_diffuseseg

REALFACE_PRESET = Path(__file__).resolve().parents[1] / "configs" / "celebamask_hq64.yaml"
DIFFUSESEG_64 = dict(im_channels=3, im_size=64, down_channels=[64, 128, 256, 512], mid_channels=[512, 512, 256],
                     down_sample=[True, True, True], time_emb_dim=256, num_down_layers=2, num_mid_layers=2,
                     num_up_layers=2, num_heads=4)


# Every workload's share of the peak, in the order measured, for the closing summary.
_SHARES: list[tuple[str, float]] = []


def share(label: str, gflops: float, peak: float) -> str:
    """``gflops`` as a percentage of ``peak``, recorded for the summary that ends the run."""
    _SHARES.append((label, gflops / peak))
    return f"{100 * gflops / peak:.0f}%"


def print_shares(peak: float) -> None:
    if not _SHARES:
        return
    print(f"\nagainst the peak ({peak:.1f} GFLOP/s): " + "; ".join(f"{k} {100 * v:.0f}%" for k, v in _SHARES))
    over = [k for k, v in _SHARES if v > 1.0]
    print("above 100 %: " + ", ".join(over) + " (the peak's shapes miss a kernel these run: not a bound for them)"
          if over else "no workload above 100 %: the peak bounds every figure of this run")


def bench_model(name: str, cfg: Config, batch: int, device: torch.device, steps: int, peak: float) -> None:
    torch.manual_seed(0)
    model = UNet(cfg.model).to(device)
    schedule = schedule_from_config(cfg.diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = autocast_dtype(device, cfg.train.mixed_precision)
    x0 = torch.rand(batch, cfg.model.im_channels, cfg.model.im_size, cfg.model.im_size, device=device) * 2 - 1

    def train_step(net: torch.nn.Module = model) -> None:
        with autocast(device, amp):
            loss = diffusion_loss(net, schedule, x0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_flops = training_flops_per_image(cfg, batch) * batch
    t_train = median_seconds(train_step, device, warmup=2, steps=steps)
    compiled = None
    if cfg.train.compile != "none":  # the same step compiled, timed in the same run as the eager one
        net = maybe_compile(model, cfg.train.compile, cfg.run.compile_backend)
        start = time.perf_counter()
        train_step(net)
        sync(device)
        compile_s = time.perf_counter() - start
        compiled = (median_seconds(lambda: train_step(net), device, warmup=1, steps=steps), compile_s)

    model.eval()
    t = torch.full((batch,), 500, device=device)
    with torch.no_grad(), flop_counter() as counter:
        model(x0, t)
    fwd_flops = counter.get_total_flops()

    def denoise() -> None:
        with torch.no_grad(), autocast(device, amp):
            model(x0, t)
    t_fwd = median_seconds(denoise, device, warmup=2, steps=steps)
    ddim = make_sampler(cfg, "ddim", 100)
    features = _time_features(cfg, model, schedule, x0, device, steps)
    print(f"\n[{name}] {count_parameters(model) / 1e6:.2f} M params, {cfg.model.im_size} px, batch {batch}, "
          f"attention {cfg.model.attention}, autocast {amp or 'off'}")
    print(f"  training : {batch / t_train:8.1f} img/s  {t_train:7.3f} s/step  "
          f"{train_flops / batch / 1e9:6.2f} GFLOP/img  {train_flops / t_train / 1e9:7.1f} GFLOP/s "
          f"({share(f'{name}: training', train_flops / t_train / 1e9, peak)} of peak)")
    if compiled:
        t_comp, compile_s = compiled
        print(f"  compiled : {batch / t_comp:8.1f} img/s  {t_comp:7.3f} s/step  {train_flops / t_comp / 1e9:7.1f} GFLOP/s "
              f"({share(f'{name}: training compiled', train_flops / t_comp / 1e9, peak)} of peak; "
              f"{t_train / t_comp:.2f}x eager) "
              f"train.compile={cfg.train.compile}, backend {cfg.run.compile_backend}, first step {compile_s:.0f} s")
    print(f"  denoiser : {batch / t_fwd:8.1f} img/s per network evaluation  "
          f"{fwd_flops / t_fwd / 1e9:7.1f} GFLOP/s ({share(f'{name}: denoiser', fwd_flops / t_fwd / 1e9, peak)} of peak)")
    feat_flops, t_feat, feat_compiled = features
    n_t = len(cfg.features.timesteps)
    print(f"  features : {batch / t_feat:8.1f} img/s ({n_t} timesteps in one pass)  {feat_flops / t_feat / 1e9:7.1f} "
          f"GFLOP/s ({share(f'{name}: features', feat_flops / t_feat / 1e9, peak)} of peak)")
    if feat_compiled:
        t_comp, compile_s = feat_compiled
        print(f"  compiled : {batch / t_comp:8.1f} img/s features  {feat_flops / t_comp / 1e9:7.1f} GFLOP/s "
              f"({share(f'{name}: features compiled', feat_flops / t_comp / 1e9, peak)} of peak; "
              f"{t_feat / t_comp:.2f}x eager) features.compile={cfg.features.compile}, first pass {compile_s:.0f} s")
    print(f"  sampling : {batch / (t_fwd * len(ddim.timesteps)):8.2f} img/s with DDIM-{len(ddim.timesteps)}, "
          f"{batch / (t_fwd * cfg.diffusion.num_train_timesteps):8.3f} img/s with DDPM-"
          f"{cfg.diffusion.num_train_timesteps}")


def _time_features(cfg: Config, model: torch.nn.Module, schedule, images: torch.Tensor, device: torch.device,
                   steps: int) -> tuple[float, float, tuple[float, float] | None]:
    """Feature extraction over ``model`` (the configured timesteps in one pass; its first three decoder blocks
    where the configured ones are not in it): (FLOPs of one pass, seconds eager, (seconds, first pass's
    seconds) compiled where ``features.compile`` asks, else None)."""
    from diffuseseg.features import FeatureExtractor

    f = cfg.features
    blocks = [b for b in f.blocks if b in model.block_names] or list(model.block_names[:3])

    def extractor(mode: str) -> FeatureExtractor:
        return FeatureExtractor(model, schedule, f.timesteps, blocks, label_size=cfg.model.im_size, compile=mode,
                                compile_backend=cfg.run.compile_backend)
    eager = extractor("none")
    with flop_counter() as counter:
        eager(images)
    t_eager = median_seconds(lambda: eager(images), device, warmup=1, steps=steps)
    if f.compile == "none":
        return counter.get_total_flops(), t_eager, None
    compiled = extractor(f.compile)
    start = time.perf_counter()
    compiled(images)
    sync(device)
    compile_s = time.perf_counter() - start
    return counter.get_total_flops(), t_eager, (median_seconds(lambda: compiled(images), device, 1, steps), compile_s)


def bench_segmentation(cfg: Config, device: torch.device, threads: int) -> None:
    from diffuseseg.pixel_classifier import PixelEnsemble
    from diffuseseg.segmentation import build_extractor, extract, segment
    from diffuseseg.toy_faces import CLASS_NAMES, render_faces
    from diffuseseg.views import VIEW_SETS, resolve_views

    extractor = build_extractor(cfg, "random_unet", device)  # speed does not depend on the weights
    images = render_faces(range(64), cfg.model.im_size)[0]
    seconds = median_seconds(lambda: extract(extractor, images, batch_size=cfg.features.batch_size), device, 1, 3)
    print(f"\n[segmentation, {cfg.model.im_size} px, {extractor.dim} features/pixel, "
          f"{len(cfg.features.timesteps)} timesteps in one batched pass]")
    print(f"  feature extraction : {len(images) / seconds:8.1f} img/s")
    ensemble = PixelEnsemble(extractor.dim, len(CLASS_NAMES), cfg.ensemble.members).eval()
    for name in VIEW_SETS:
        views = resolve_views(name, CLASS_NAMES, "views")
        seconds = median_seconds(lambda: segment(extractor, ensemble, images, views=views,
                                                  batch_size=cfg.features.batch_size), device, 1, 3)
        print(f"  segmentation       : {len(images) / seconds:8.1f} img/s (features + {cfg.ensemble.members} MLPs "
              f"+ vote + uncertainty; test_views={name}: {len(views)} per image)")
    sizes = ((extractor.dim, len(CLASS_NAMES), "toy config"), (624, 20, "DiffuseSeg 64 px features"))
    for dim, classes, label in sizes:
        r = benchmark_epoch(cfg.ensemble.members, dim, classes, pixels=50_000, batch_size=cfg.ensemble.batch_size,
                            threads=threads or None, steps=200)
        print(f"  ensemble epoch ({label}, d={dim}, C={classes}, 50k px, batch {cfg.ensemble.batch_size}): "
              f"stacked {r['stacked_s']:.2f} s; {cfg.ensemble.members} MLPs one after another "
              f"{r['sequential_s']:.2f} s ({r['sequential_s'] / r['stacked_s']:.1f}x), "
              f"with fused Adam {r['sequential_fused_adam_s']:.2f} s "
              f"({r['sequential_fused_adam_s'] / r['stacked_s']:.1f}x); stacked at {r['stacked_gflops']:.0f} GFLOP/s")


def bench_segmenter(cfg: Config, device: torch.device, peak: float, steps: int = 60) -> None:
    """The supervised segmenter's training step (section segmenter; and the student's width, section student)
    eager and compiled (``segmenter.compile``) in one run, through ``train_segmenter``'s own loop on random
    pairs at the config's size: the time does not depend on the pixels. A step's time is the median gap
    between consecutive steps after the first few; the compiled run's first step holds its compile."""
    from diffuseseg.segmenter import AUTO_COMPILE_MIN_STEPS, build_segmenter, resolve_compile, train_segmenter

    seg, size, classes = cfg.segmenter, cfg.model.im_size, 19
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, classes, (32, size, size), dtype=np.uint8)
    compiled = resolve_compile(seg.compile, device, AUTO_COMPILE_MIN_STEPS)  # what a full-length run would use
    modes = ["none"] + ([compiled] if compiled != "none" else [])
    print(f"\n[segmenter training, {seg.arch}, {size} px, batch {seg.batch_size}, {classes} classes; "
          f"median of {steps} steps through train_segmenter]")
    for width in dict.fromkeys((seg.base_channels, cfg.student.base_channels)):
        model = build_segmenter(seg.arch, classes, width, seg.levels).to(device).train()
        x = torch.rand(seg.batch_size, 3, size, size, device=device)
        with flop_counter() as counter:
            model(x).sum().backward()
        flops = counter.get_total_flops()
        eager_s = None
        for mode in modes:
            stamps: list[float] = []
            start = time.perf_counter()
            train_segmenter(images, masks, classes, arch=seg.arch, base_channels=width, levels=seg.levels,
                            steps=steps + 5, batch_size=seg.batch_size, device=device, progress=False,
                            callback=lambda step, loss: stamps.append(time.perf_counter()),
                            compile=mode, compile_backend=cfg.run.compile_backend)
            gaps = np.diff(stamps[4:])
            step_s, first_s = float(np.median(gaps)), stamps[0] - start
            label = f"base {width}, " + ("eager" if mode == "none" else f"compiled ({mode})")
            gain = f"; {eager_s / step_s:.2f}x eager, first step {first_s:.0f} s" if eager_s else ""
            print(f"  {label:28s}: {seg.batch_size / step_s:7.1f} img/s  {step_s * 1000:7.1f} ms/step  "
                  f"{flops / step_s / 1e9:6.1f} GFLOP/s ({share(f'segmenter {label}', flops / step_s / 1e9, peak)} "
                  f"of peak){gain}")
            eager_s = eager_s or step_s


def bench_photos(cfg: Config, device: torch.device, peak: float, count: int = 24) -> None:
    """segment.py's photo path (segment.align=auto) on test faces framed as photos (as is, two side by side,
    tilted 30 degrees, small in a large frame; JPEG files): photos/s, where the time goes, and the whole path
    against what its U-Net passes alone would allow at the measured peak; in the same run, the path with the C
    library's default allocator against keeping freed memory (``run.keep_freed_memory``), and the read-out three
    ways."""
    from diffuseseg.image_io import framing, open_rgb
    from diffuseseg.photo_faces import face_segmenter
    from diffuseseg.robustness import split_photo
    from diffuseseg.features import FeatureExtractor
    from diffuseseg.segment_outputs import photo_mask
    from diffuseseg.runtime import keep_freed_memory
    from diffuseseg.segmentation import (configured_views, image_member_scores, load_trained_stack, member_scores,
                                         view_features)

    extractor, readout, classes = load_trained_stack(cfg, device)
    views = configured_views(cfg, classes.names, "test")
    faces = face_segmenter(cfg, extractor, readout, classes, views)
    if faces is None:
        print("\n[photos] skipped: the read-out's classes do not name face parts")
        return

    def unet_passes(images: np.ndarray) -> None:  # the U-Net passes of the read-out, nothing else
        for view in views.views:
            extractor.block_maps(to_model_range(view.images(images)))
    split = labeled_split(cfg, "test")
    kinds = ("as_is", "two_faces", "rotate_30", "zoom_out_50")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(count):
            photo, _ = split_photo(split, i, kinds[i % len(kinds)], cfg.labels.ignore_index)
            files.append(Path(tmp) / f"{i}.jpg")
            photo.save(files[-1], quality=90)

        def timed_path() -> tuple[float, float, float, dict, list]:  # (first, total, decode, stage seconds, results)
            # The first pass over the photos grows the heap to the batch's size (its pages faulted in once); a
            # folder's later batches find it grown, so the figures are of the second pass, the first said beside.
            start = time.perf_counter()
            faces.segment([open_rgb(f) for f in files])
            first = time.perf_counter() - start
            faces.seconds = dict.fromkeys(faces.seconds, 0.0)
            start = time.perf_counter()
            photos = [open_rgb(f) for f in files]
            decode = time.perf_counter() - start
            results = faces.segment(photos)
            return first, time.perf_counter() - start, decode, dict(faces.seconds), results
        by_allocator = {}
        if keep_freed_memory(False):  # glibc: its default allocator, then keeping freed memory, in the same run
            by_allocator[False] = timed_path()
            keep_freed_memory(True)
            by_allocator[True] = timed_path()
            keep_freed_memory(cfg.run.keep_freed_memory)  # what the rest of the run measures under
        first, total, decode, seconds, results = by_allocator.get(cfg.run.keep_freed_memory) or timed_path()
    found = sum(len(r.faces) for r in results)
    crops = np.stack([f.crop for r in results for f in r.faces])
    batch = crops[:cfg.features.batch_size]
    with flop_counter() as counter:
        unet_passes(batch)
    unet_flops = counter.get_total_flops() / len(batch)  # one face's U-Net passes (every timestep and test view)
    unet_rate = unet_flops * len(batch) / median_seconds(lambda: unet_passes(batch), device, 1, 3) / 1e9
    print(f"\n[photos: segment.py with segment.align=auto, finder {cfg.segment.finder}, refiner "
          f"{cfg.segment.refiner or 'the finder'}, {count} photos ({', '.join(kinds)}), {found} faces]")
    print(f"  whole path         : {count / total:6.2f} photos/s, {found / total:6.2f} faces/s (a folder's first "
          f"batch, the heap still growing: {count / first:.2f} photos/s)")
    stages = {"decode": decode, **seconds}
    print("  time               : " + ", ".join(f"{k} {v / total:.0%}" for k, v in stages.items()))
    print(f"  U-Net passes alone : {unet_flops / 1e9:.2f} GFLOP per face, {unet_rate:.1f} GFLOP/s in batches of "
          f"{len(batch)} = {share('photo U-Net passes', unet_rate, peak)} of the {peak:.0f} GFLOP/s peak; they "
          f"are {found * unet_flops / 1e9 / unet_rate / total:.0%} of the whole path's time")
    print(f"  whole path / U-Net passes alone at the peak: "
          f"{share('photo path', found * unet_flops / total / 1e9, peak)} (the first batch: "
          f"{found * unet_flops / first / 1e9 / peak:.0%})")
    if by_allocator:
        print(f"  the same path with the C library's default allocator: {count / by_allocator[False][1]:.2f} "
              f"photos/s; keeping freed memory (run.keep_freed_memory): "
              f"{by_allocator[False][1] / by_allocator[True][1]:.2f}x (first batch "
              f"{by_allocator[False][0] / by_allocator[True][0]:.2f}x)")
    # The read-out of one batch of crops three ways: what it cost before the block path (stored-feature maps,
    # the U-Net's default layout), the layout alone, and segment.py's path now.
    default_layout = FeatureExtractor(copy.deepcopy(extractor.model), extractor.schedule, extractor.timesteps,
                                      extractor.blocks, label_size=extractor.label_size, channels_last=False)
    layouts = {False: default_layout, True: extractor}
    ways = {"stored features, default layout": (False, False), "stored features, channels-last": (True, False),
            "block maps, channels-last (segment.py)": (True, True)}
    seconds = {}
    for name, (channels_last, direct) in ways.items():
        ext = layouts[channels_last]
        if direct:
            seconds[name] = median_seconds(lambda: image_member_scores(ext, readout, batch, views), device, 1, 3)
        else:
            seconds[name] = median_seconds(lambda: member_scores(readout, view_features(ext, batch, views), views),
                                           device, 1, 3)
    first = next(iter(seconds.values()))
    for name, sec in seconds.items():
        print(f"  read-out, {name:40s}: {sec / len(batch):5.3f} s per face, {first / sec:4.2f}x")
    # The mask at the photo's own size (an aligned photo's: segment_outputs.photo_mask) grows with its pixels.
    grid = extractor.label_size
    scores = image_member_scores(extractor, readout, batch[:1], views)
    scores = scores.reshape(scores.shape[0], grid, grid, -1)
    face = seconds["block maps, channels-last (segment.py)"] / len(batch)
    for side in (256, 1024):
        where = framing((side, side), cfg.model.im_size, "center")
        sec = median_seconds(lambda: photo_mask(scores, where, cfg.ensemble.vote), device, 1, 3)
        print(f"  mask of a {side} px photo at its size: {sec / face:.0%} of a face's read-out")


def _profile_shares(fn) -> dict[str, float]:
    """Shares of self CPU time of one call of ``fn``, by kind of operator."""
    from torch.profiler import ProfilerActivity, profile
    kinds = (("convolutions", ("conv",)), ("GroupNorm", ("group_norm",)), ("ReLU", ("relu", "threshold")),
             ("loss", ("softmax", "nll")), ("optimizer", ("adam", "foreach", "optimizer", "lerp", "addcdiv", "sqrt")),
             ("batch assembly (index, windows, pad, copies)", ("index", "stack", "cat", "pad", "copy", "to_copy")))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    totals = dict.fromkeys([k for k, _ in kinds] + ["other"], 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, words in kinds if any(w in name for w in words)), "other")
        totals[kind] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {k: v / whole for k, v in totals.items()}


def bench_readout(cfg: Config, device: torch.device, peak: float, labeled: int = 20, timed_steps: int = 20) -> None:
    """Where one conv-head read-out fit goes, at the config's size (``--config configs/celebamask_hq64.yaml``
    for real faces): feature extraction, the training steps (whole maps against ``conv_head.crop`` windows, and
    compiled where ``conv_head.compile`` asks), and prediction. Features are random: the time does not depend on
    their values, and no data or trained weights are needed."""
    from diffuseseg.conv_head import train_conv_heads
    from diffuseseg.segmentation import build_extractor, extract

    extractor = build_extractor(cfg, "random_unet", device)
    size, dim, h = extractor.label_size, extractor.dim, cfg.conv_head
    classes = 19
    images = (torch.rand(2 * cfg.features.batch_size, cfg.model.im_size, cfg.model.im_size, 3) * 255).byte().numpy()
    t_extract = median_seconds(lambda: extract(extractor, images, batch_size=cfg.features.batch_size), device, 1, 2)
    per_map = t_extract / len(images)
    rng = np.random.default_rng(0)
    maps = 2 * labeled  # each labeled image and its mirror (ensemble.train_views=flip)
    feats = rng.standard_normal((maps, size, size, dim), dtype=np.float32).astype(np.float16)
    labels = rng.integers(0, classes, (maps, size, size)).astype(np.uint8)
    print(f"\n[read-out: {h.members} conv heads of {h.hidden} channels on {size} px maps of {dim} features, "
          f"batch {h.batch_size}, {h.steps} steps; {labeled} labeled images + mirrors]")
    print(f"  feature extraction : {1 / per_map:7.1f} maps/s ({len(extractor.timesteps)} timesteps in one pass)")

    def fit(steps: int, crop: int, compile_mode: str = "none"):
        return train_conv_heads(feats, labels, classes, members=h.members, hidden=h.hidden, steps=steps,
                                batch_size=h.batch_size, shift=h.shift, crop=crop, device=device, progress=False,
                                compile=compile_mode, compile_backend=cfg.run.compile_backend)

    def flops_per_step(crop: int) -> float:
        heads = fit(1, crop)
        side = crop if 0 < crop < size else size
        x = torch.randn(min(h.batch_size, maps), dim, side, side, device=device)
        with flop_counter() as counter:
            heads.train()(x).float().sum().backward()
        return counter.get_total_flops()

    variants = [("whole maps", 0, "none")] + ([(f"{h.crop} px windows", h.crop, "none")] if 0 < h.crop < size else [])
    if h.compile != "none":
        variants.append((variants[-1][0] + f", compiled ({h.compile})", variants[-1][1], h.compile))
    results = {}
    for label, crop, mode in variants:
        start = time.perf_counter()
        fit(3, crop, mode)
        first = time.perf_counter() - start  # includes the compile when compiling
        start = time.perf_counter()
        fit(3, crop, mode)  # warm: the compiled graphs are cached, so the two timings below differ by steps only
        setup = time.perf_counter() - start
        start = time.perf_counter()
        fit(3 + timed_steps, crop, mode)
        per_step = (time.perf_counter() - start - setup) / timed_steps
        compiling = max(first - setup, 0.0) if mode != "none" else 0.0  # once per process
        gflops = flops_per_step(crop) / per_step / 1e9
        results[label] = per_step * h.steps + setup + compiling
        print(f"  train, {label:28s}: {per_step:6.3f} s/step, {gflops:6.1f} GFLOP/s "
              f"({share(f'read-out: {label}', gflops, peak)} of "
              f"peak); {h.steps} steps {per_step * h.steps / 60:5.1f} min (+ {setup:.0f} s setup"
              + (f", {compiling:.0f} s compiling)" if mode != "none" else ")"))
    shares = _profile_shares(lambda: fit(10, variants[-1][1]))
    print(f"  where a step of '{variants[-1][0]}' goes (self CPU time): "
          + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()))
    heads = fit(1, 0)
    t_predict = median_seconds(lambda: heads.member_logits(feats[:16]), device, 1, 2) / 16
    print(f"  prediction         : {1 / t_predict:7.1f} maps/s")
    val = 2 * 100  # 100 val faces and their mirrors (ensemble.test_views=flip)
    for label, train_s in results.items():
        whole = per_map * (maps + val) + train_s + t_predict * val
        print(f"  one fit scored on 100 val faces, {label}: {whole / 60:5.1f} min (extraction "
              f"{per_map * (maps + val) / whole:.0%}, training {train_s / whole:.0%}, prediction "
              f"{t_predict * val / whole:.0%})")


def _run_with_peak_rss(script: str, sets: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of ``utils/<script>`` with ``--set`` overrides, in a fresh process."""
    code = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0]); "
            f"runpy.run_path(sys.argv[0] + '/{script}', run_name='__main__'); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent),
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return seconds, int(proc.stdout.split("PEAK_RSS_KB")[1].split()[0]) / 1024, proc.stdout


def bench_windows(maps: int = 120, windows: int = 100, side: int = 64, dim: int = 1008, crop: int = 32) -> None:
    """What a conv-head fit reads from memory-mapped features that are not in the page cache: ``windows`` random
    ``crop`` px windows of (side, side, dim) float16 maps, read three ways from a file just evicted from the cache
    (posix_fadvise DONTNEED): memory-map slices (the fit before session 7), the same with readahead off
    (MADV_RANDOM), and each window's band of whole rows in one pread (the fit now, ``conv_head._band_windows``).
    Bytes read come from /proc/self/io (Linux)."""
    import mmap
    import os

    from diffuseseg.conv_head import _band_windows

    def read_bytes() -> int:
        with open("/proc/self/io") as io:
            return next(int(line.split()[1]) for line in io if line.startswith("read_bytes"))
    rng = np.random.default_rng(0)
    picks, corners = rng.permutation(maps)[:windows], rng.integers(0, side - crop + 1, (windows, 2))  # distinct maps
    row = side * dim * 2
    print(f"\n[conv-head windows from disk: {windows} windows of {crop} px from {maps} maps {side}x{side}x{dim} "
          f"float16, cold page cache; the windows hold {windows * crop * crop * dim * 2 / 1e6:.0f} MB, their whole "
          f"maps {windows * row * side / 1e6:.0f} MB]")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "maps.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(maps, side, side, dim))
        array[:] = 1
        array.flush()
        del array

        def memory_map(advice: int | None) -> None:
            array = np.load(path, mmap_mode="r")
            if advice is not None:
                array._mmap.madvise(advice)
            np.stack([array[i, dy:dy + crop, dx:dx + crop] for i, (dy, dx) in zip(picks, corners)])

        ways = {"memory-map slices": lambda: memory_map(None),
                "memory-map slices, readahead off": lambda: memory_map(mmap.MADV_RANDOM),
                "one pread per window's rows (the fit)": lambda: _band_windows(np.load(path, mmap_mode="r"), picks,
                                                                               corners, crop)}
        for name, read in ways.items():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            before, start = read_bytes(), time.perf_counter()
            read()
            print(f"  {name:38s}: {(read_bytes() - before) / 1e6:7.0f} MB read in {time.perf_counter() - start:5.2f} s")


def bench_store(cfg: Config, threads: int) -> None:
    """Peak RSS of extract_features.py for 20 vs 200 images: a fresh process per size, a random 64 px
    U-Net of the default shape."""
    from diffuseseg.checkpoint import export_weights

    print("\n[feature store: utils/extract_features.py at 64 px, random-init U-Net]")
    with tempfile.TemporaryDirectory() as tmp:
        cfg64 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, im_size=64))
        torch.manual_seed(0)
        weights = export_weights(Path(tmp) / "random64.pt", UNet(cfg64.model).state_dict(), cfg64)
        for n in (20, 200):
            sets = ["model.im_size=64", f"run.checkpoint={weights}", f"data.root={tmp}/toy",
                    f"labels.labeled_dir={tmp}/toy/labeled", "labels.labeled_range=[0,200]",
                    "data.labeled_indices=[2000000,2000200]",
                    f"labels.num_labeled={n}", f"features.store_dir={tmp}/store{n}", f"run.threads={threads}"]
            _, rss, _ = _run_with_peak_rss("extract_features.py", sets)
            store = sum(f.stat().st_blocks * 512 for f in Path(f"{tmp}/store{n}").iterdir()) / 2 ** 20
            print(f"  feature store, {n:3d} images at 64 px: peak RSS {rss:7.0f} MiB, store on disk {store:6.0f} MiB")


# google/ddpm-ema-celebahq-256's published UNet2DModel config (the ddpm-ema-*-256 family shares it).
CELEBAHQ_256 = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=[128, 128, 256, 256, 512, 512],
                    down_block_types=["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                      "DownBlock2D"],
                    up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
                    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
                    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32,
                    time_embedding_type="positional")


def bench_celebahq256(cfg: Config, threads: int, blocks: list[str], sizes: tuple[int, ...] = (10, 40),
                      label_sizes: tuple[int, ...] = (256, 64)) -> None:
    """extract_features.py on the ddpm-ema-celebahq-256 architecture (random weights: nothing is
    downloaded), 256 px toy faces, no training views: images/s, peak RSS and store size for each number of
    images and each read-out resolution (features.label_size)."""
    from diffusers import DDPMScheduler, UNet2DModel

    print(f"\n[feature store at 256 px: ddpm-ema-celebahq-256 architecture, random weights, blocks {blocks}, "
          f"timesteps {list(cfg.features.timesteps)}, {threads} threads]")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        net = UNet2DModel(**CELEBAHQ_256)
        net.save_pretrained(f"{tmp}/model")
        DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                      clip_sample=True).save_pretrained(f"{tmp}/model")
        print(f"  {sum(p.numel() for p in net.parameters()) / 1e6:.1f} M parameters")
        del net
        base = ["model.backbone=diffusers", f"run.checkpoint={tmp}/model", "model.im_size=256",
                f"features.blocks=[{','.join(blocks)}]", "features.batch_size=1", f"data.root={tmp}/toy",
                f"labels.labeled_dir={tmp}/toy/labeled", f"labels.labeled_range=[0,{max(sizes)}]",
                f"data.labeled_indices=[2000000,{2000000 + max(sizes)}]", f"run.threads={threads}",
                "ensemble.train_views=none"]
        # Render the 256 px faces once, outside the timed runs.
        labeled_split(load_config(Path(__file__).resolve().parents[1] / "config.yaml", base), "labeled")
        for label_size in label_sizes:
            for n in sizes:
                store_dir = f"{tmp}/store_{label_size}_{n}"
                seconds, rss, _ = _run_with_peak_rss("extract_features.py", base + [
                    f"labels.num_labeled={n}", f"features.store_dir={store_dir}",
                    f"features.label_size={label_size}"])
                store = sum(f.stat().st_blocks * 512 for f in Path(store_dir).iterdir()) / 2 ** 30
                print(f"  label size {label_size:3d}, {n:3d} images: {n / seconds:6.3f} img/s (whole script, "
                      f"{seconds:5.0f} s), peak RSS {rss:6.0f} MiB, store on disk {store:6.2f} GiB")
                shutil.rmtree(store_dir)


def bench_generation(cfg: Config, device: torch.device) -> None:
    from diffuseseg.pixel_classifier import PixelEnsemble
    from diffuseseg.segmentation import build_extractor, configured_views, segment
    from diffuseseg.toy_faces import CLASS_NAMES

    extractor = build_extractor(cfg, "random_unet", device)
    ensemble = PixelEnsemble(extractor.dim, len(CLASS_NAMES), cfg.ensemble.members).eval()
    views = configured_views(cfg, CLASS_NAMES, "test")
    n, g = cfg.generate.batch_size, cfg.generate.steps
    from diffuseseg.sampling import generate_images
    t0 = time.perf_counter()
    images = generate_images(extractor.model, cfg, n, sampler="ddim", steps=g, batch_size=n, device=device,
                             progress=False)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    segment(extractor, ensemble, images, views=views, batch_size=cfg.features.batch_size)
    t_seg = time.perf_counter() - t0
    print(f"\n[generation: {n} pairs, DDIM {g} steps, {cfg.model.im_size} px, test_views={cfg.ensemble.test_views}]")
    print(f"  sampling     {n / t_sample:7.2f} pairs/s ({t_sample:.1f} s)")
    print(f"  segmentation {n / t_seg:7.2f} pairs/s ({t_seg:.1f} s)")
    print(f"  together     {n / (t_sample + t_seg):7.2f} pairs/s")


def bench_data(cfg: Config, batches: int = 20) -> None:
    """Images/s of the DDPM's training stream with no workers and with ``data.num_workers``."""
    from diffuseseg.datasets import training_batches
    workers = sorted({0, cfg.data.num_workers})
    print(f"\n[data: {cfg.data.source}, {cfg.model.im_size} px, batch {cfg.train.batch_size}, {batches} batches]")
    for n in workers:
        stream = training_batches(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=n)))
        next(stream)  # workers started, first batch rendered
        t0 = time.perf_counter()
        for _ in range(batches):
            next(stream)
        print(f"  {n:2d} workers {batches * cfg.train.batch_size / (time.perf_counter() - t0):9.1f} img/s")


def benchmark_epoch(members: int = 10, dim: int = 624, num_classes: int = 20, pixels: int = 50_000,
                    batch_size: int = 64, threads: int | None = 1, steps: int | None = None,
                    seed: int = 0) -> dict[str, float]:
    """Seconds for one training epoch of the stacked ensemble (as ``train_ensemble`` runs it) vs the
    same E ``MemberMLP``s (official order) trained one after another, on random data: with the
    default Adam (the official loop) and with the same fused Adam as the stack (like for like).
    ``steps`` times only the first ``steps`` mini-batches of each and scales to the full epoch."""
    import copy

    import torch.nn.functional as F

    from diffuseseg.pixel_classifier import MemberSampler, PixelEnsemble, make_adam, member_losses
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(pixels, dim, generator=g)
    y = torch.randint(num_classes, (pixels,), generator=g)
    batches = list(MemberSampler(pixels, members, batch_size, seed).epoch())
    full = len(batches)
    batches = batches[:steps] if steps else batches
    scale = full / len(batches)

    ens = PixelEnsemble(dim, num_classes, members).train()
    initial = ens.to_member_modules()
    opt = make_adam(ens.parameters(), 1e-3)
    t0 = time.perf_counter()
    for idx in batches:
        loss = member_losses(ens, x[idx], y[idx]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    result = {"stacked_s": (time.perf_counter() - t0) * scale}

    for name, make in (("sequential_s", lambda p: torch.optim.Adam(p, lr=1e-3)),
                       ("sequential_fused_adam_s", lambda p: make_adam(p, 1e-3))):
        modules = copy.deepcopy(initial)
        t0 = time.perf_counter()
        for k, mlp in enumerate(modules):
            opt = make(mlp.parameters())
            for idx in batches:
                loss = F.cross_entropy(mlp(x[idx[k]]), y[idx[k]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        result[name] = (time.perf_counter() - t0) * scale
    # Training FLOPs ~ 3x the forward GEMMs (forward, grad wrt input, grad wrt weight): how close the
    # stacked epoch runs to the machine's GEMM peak, i.e. how much room any other schedule could have.
    h1, h2 = ens.hidden
    flops_per_step = 3 * 2 * batch_size * members * (dim * h1 + h1 * h2 + h2 * num_classes)
    result["stacked_gflops"] = flops_per_step * full / result["stacked_s"] / 1e9
    result["speedup"] = result["sequential_s"] / result["stacked_s"]
    result["speedup_same_adam"] = result["sequential_fused_adam_s"] / result["stacked_s"]
    result.update(steps_timed=len(batches), steps_per_epoch=full, threads=torch.get_num_threads())
    return result


def main() -> None:
    parser = config_parser(__doc__.splitlines()[0], __doc__.split("\n", 2)[2])
    parser.add_argument("--models", nargs="+", default=["default", "realface64", "diffuseseg64"],
                        choices=["default", "realface64", "diffuseseg64"],
                        help="which model configs to time (realface64: configs/celebamask_hq64.yaml's U-Net)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per figure (median)")
    parser.add_argument("--parts", nargs="+", default=["ddpm", "segmentation", "store", "generation"],
                        choices=["ddpm", "segmentation", "store", "generation", "data", "celebahq256", "readout",
                                 "segmenter", "photos", "windows"],
                        help="which figures to produce (celebahq256: the feature store on a 256 px diffusers "
                             "backbone, minutes and GBs of disk; only when named)")
    parser.add_argument("--celebahq-blocks", nargs="+", default=["up_blocks.1", "up_blocks.2"],
                        help="diffusers blocks read by the celebahq256 part")
    parser.add_argument("--celebahq-images", type=int, nargs="+", default=[10, 40],
                        help="numbers of labeled images the celebahq256 part stores")
    parser.add_argument("--celebahq-label-sizes", type=int, nargs="+", default=[256, 64],
                        help="read-out resolutions (features.label_size) of the celebahq256 part")
    parser.add_argument("--diffuseseg-batch", type=int, default=8, help="batch for the DiffuseSeg 64 px config")
    args = parser.parse_args()
    cfg = config_from_args(args)
    configure_run(cfg.run)
    device = resolve_device(cfg.run.device)
    peak, shapes = peak_gflops(device)
    best = sorted(shapes.items(), key=lambda kv: -kv[1])
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"measured fp32 peak: {peak:.1f} GFLOP/s, the best of {len(shapes)} GEMM and convolution figures "
          f"(each the best of 2 rounds); top: " + ", ".join(f"{k} {v:.0f}" for k, v in best[:4])
          + f"; lowest: {best[-1][0]} {best[-1][1]:.0f}")
    if "ddpm" in args.parts and "default" in args.models:
        bench_model("default toy config", cfg, cfg.train.batch_size, device, args.steps, peak)
    if "ddpm" in args.parts and "realface64" in args.models:
        real = load_config(REALFACE_PRESET)
        bench_model("real-face 64 px config", dataclasses.replace(cfg, model=real.model), real.train.batch_size,
                    device, args.steps, peak)
    if "ddpm" in args.parts and "diffuseseg64" in args.models:
        ds = dataclasses.replace(cfg, model=model_config_from_diffuseseg(DIFFUSESEG_64))
        bench_model("DiffuseSeg 64 px config", ds, args.diffuseseg_batch, device, args.steps, peak)
    if "segmentation" in args.parts:
        bench_segmentation(cfg, device, cfg.run.threads or torch.get_num_threads())
    if "store" in args.parts:
        bench_store(cfg, cfg.run.threads or torch.get_num_threads())
    if "generation" in args.parts:
        bench_generation(cfg, device)
    if "data" in args.parts:
        bench_data(cfg)
    if "readout" in args.parts:
        bench_readout(cfg, device, peak)
    if "segmenter" in args.parts:
        bench_segmenter(cfg, device, peak)
    if "photos" in args.parts:
        bench_photos(cfg, device, peak)
    if "windows" in args.parts:
        bench_windows()
    if "celebahq256" in args.parts:
        bench_celebahq256(cfg, cfg.run.threads or torch.get_num_threads(), args.celebahq_blocks,
                          tuple(args.celebahq_images), tuple(args.celebahq_label_sizes))
    print_shares(peak)


if __name__ == "__main__":
    run_main(main)
