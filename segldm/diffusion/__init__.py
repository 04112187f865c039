"""Pure tensor math of the diffusion process: schedules, forward noising, samplers."""

SAMPLER_NAMES = ("ddim", "dpm_solver++", "dpm_solver++_sde")
