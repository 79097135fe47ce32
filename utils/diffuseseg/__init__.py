"""DiffuseSeg: one unconditional DDPM for image synthesis and label-efficient segmentation.

Modules (one concept each): ``config`` (the one YAML config), ``unet`` (the denoiser),
``diffusion`` (noise schedules, loss, DDPM/DDIM samplers), ``toy_faces`` (the embedded data set),
``datasets`` (on-disk image / mask layouts), ``label_formats`` (real-data mask formats),
``checkpoint`` (weights on disk), ``training`` (the DDPM training loop), ``sampling`` (config ->
images), ``features`` (pixel features from the frozen U-Net), ``feature_store`` (features on disk),
``pixel_classifier`` (the vectorised MLP ensemble), ``metrics`` (mIoU and friends),
``segmentation`` (features -> ensemble -> masks), ``study`` (baselines), ``factory`` (synthetic
labeled data sets), ``segmenter`` (the downstream network), ``visualize`` (grids and overlays),
``runtime`` (device, threads, precision, DDP), ``config``, ``cli``, ``io``, ``errors``.
Scripts in ``utils/`` are thin wrappers around these.
"""
