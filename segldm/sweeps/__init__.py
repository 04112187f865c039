"""Hydra multiruns as sweeps: job identity, resume by skipping, and the sweep report."""
