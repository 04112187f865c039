"""Datasets yielding the SFLCKR sample format, and the LightningDataModule that serves them."""
