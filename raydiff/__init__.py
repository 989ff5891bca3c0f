"""raydiff: Ray + DeepSpeed training of Stable Diffusion XL with the Input Perturbation objective."""

__version__ = "0.1.0"
