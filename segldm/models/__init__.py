"""Plain PyTorch networks that mirror the CompVis latent-diffusion reference key-for-key."""
