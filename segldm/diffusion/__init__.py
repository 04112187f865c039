"""Pure tensor math of the diffusion process: schedules, forward noising, samplers (a registry)."""
