"""DiffuseSeg: one unconditional DDPM for image synthesis and label-efficient segmentation.

Modules (one concept each): ``config`` (the one YAML config), ``unet`` (the denoiser),
``diffusion`` (noise schedules, loss, DDPM/DDIM samplers), ``toy_faces`` (the embedded data set),
``datasets`` (on-disk image / mask layouts), ``checkpoint`` (atomic save / load),
``visualize`` (grids and overlays). Scripts in ``utils/`` are thin wrappers around these.
"""
