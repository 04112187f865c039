"""segldm: mask-conditioned latent diffusion (CompVis semantic synthesis) on Hydra, Lightning and MLflow."""

from segldm.config import register_resolvers

register_resolvers()

__version__ = "0.1.0"
