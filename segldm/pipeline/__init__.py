"""Masks in, images out: one generation path (conditioning, sampler, decode, uint8) for grids, sample and eval."""
