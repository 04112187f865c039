"""Scoring checkpoints: generated FID/KID/mIoU of an LDM, reconstruction quality of a first stage."""
