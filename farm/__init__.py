"""farm: a distributed batch render farm for Stable Diffusion on Ray."""

__version__ = "0.1.0"
