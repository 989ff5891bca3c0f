"""Data: the demo dataset, SDXL image transforms, a source's manifest and read units, the Ray Data preprocessing
pipeline, precompute (frozen encoders, cache) and each training worker's batches (``loader``).

Import the modules themselves (``from raydiff.data import pipeline``): the package imports nothing, so a light
module (``transforms``, ``buckets``) never pulls in Ray.
"""
