"""segldm: mask-conditioned latent diffusion (CompVis semantic synthesis) on Hydra, Lightning and MLflow."""

from segldm.config.resolvers import register_resolvers

register_resolvers()

__version__ = "0.1.0"
