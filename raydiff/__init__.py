"""raydiff: Ray + DeepSpeed training of Stable Diffusion XL with the Input Perturbation objective."""

from raydiff import log

__version__ = "0.1.0"

log.setup()  # here: every process that imports raydiff (driver, Train workers, Ray Data and Tune actors) logs alike
