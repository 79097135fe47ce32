"""An ensemble of small pixel MLPs (Baranchuk et al., ICLR 2022), all members computed at once.

Each member is ``Linear(d, h1) -> ReLU -> BatchNorm1d -> Linear(h1, h2) -> ReLU -> BatchNorm1d ->
Linear(h2, C)`` ("official" order) or with BatchNorm before ReLU ("diffuseseg" order, the layout of
DiffuseSeg's ``mlp_<k>_best.pt`` files); (h1, h2) = (128, 32), or (256, 128) for 30+ classes, as the
official code (``official_hidden``). Instead of E separate modules trained one after another, the
E members' parameters are stacked along a leading member axis and run as batched matmuls; batch norm
treats every (member, channel) pair as its own channel, so each member normalises with the statistics
of its own mini-batch. Adam is element-wise, so one Adam over the stacked tensors is exactly E
independent Adams: training the stack is the same computation as training the members separately
(``tests/test_pixel_classifier.py`` checks it step by step, to float rounding), with E times fewer,
larger kernels. ``utils/benchmark.py`` times it against the sequential loop.

Modules: ``model`` (stacked layers, the ensemble, its per-member views), ``training`` (samplers, the
official stopping rule, ``train_ensemble``), ``prediction`` (logits, vote, uncertainty), ``files`` (our
ensemble file and DiffuseSeg's / the official per-member MLP files). Everything public is importable from
the package.
"""
from diffuseseg.pixel_classifier.files import load_diffuseseg_mlps, load_ensemble, member_files, save_ensemble
from diffuseseg.pixel_classifier.model import (ENSEMBLE_FORMAT, INITS, LAYER_ORDERS, MemberMLP, PixelEnsemble,
                                               StackedBatchNorm, StackedLinear, official_hidden)
from diffuseseg.pixel_classifier.prediction import feature_pixels, image_uncertainty_score, predict, uncertainty, vote
from diffuseseg.pixel_classifier.training import (MemberSampler, derived_seed, make_adam, member_losses,
                                                  train_ensemble)

__all__ = ["ENSEMBLE_FORMAT", "INITS", "LAYER_ORDERS", "MemberMLP", "MemberSampler", "PixelEnsemble",
           "StackedBatchNorm", "StackedLinear", "derived_seed", "feature_pixels", "image_uncertainty_score",
           "load_diffuseseg_mlps", "load_ensemble", "make_adam", "member_files", "member_losses",
           "official_hidden", "predict", "save_ensemble", "train_ensemble", "uncertainty", "vote"]
