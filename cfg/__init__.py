"""Packaged Hydra configs (installed as dpft.cfg)."""
