"""Compatibility with other implementations' configs and checkpoints (CompVis latent-diffusion)."""

from segldm.compat.compvis import load_compvis

__all__ = ["load_compvis"]
