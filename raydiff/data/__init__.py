"""Data: demo dataset, SDXL image transforms, and the Ray Data pipeline.

The Ray pipeline is imported lazily so ``raydiff.data.transforms`` / ``demo`` stay usable without importing Ray.
"""

from raydiff.data.demo import ensure_demo_dataset, write_demo_dataset
from raydiff.data.transforms import CropPlan, ImageDecodeError, apply_crop, decode_image, plan_crop, time_ids

__all__ = [
    "CropPlan",
    "DataSpec",
    "ImageDecodeError",
    "OUTPUT_COLUMNS",
    "Preprocessor",
    "apply_crop",
    "build_datasets",
    "build_manifest",
    "decode_image",
    "ensure_demo_dataset",
    "plan_crop",
    "time_ids",
    "write_demo_dataset",
]

_PIPELINE_NAMES = {"DataSpec", "OUTPUT_COLUMNS", "Preprocessor", "build_datasets", "build_manifest"}


def __getattr__(name: str):
    if name in _PIPELINE_NAMES:
        from raydiff.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'raydiff.data' has no attribute {name!r}")
