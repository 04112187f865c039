"""Pure tensor math of the diffusion process: schedules, forward noising, samplers (a registry)."""

# the diffusers: sampler family registers itself into the sampler registry (diffusers is imported only
# when such a sampler is built)
import segldm.diffusion.diffusers_samplers  # noqa: F401
