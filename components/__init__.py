"""KFP v2 components: one folder per audit stage, each a thin shell over one library call
(`crossaudit.mlops.steps`, `crossaudit.mlops.gate` or `crossaudit.mlops.registry`)."""

import os

from crossaudit import __version__

# The project images from images/Dockerfile and images/Dockerfile.gpu: crossaudit and its
# pinned dependencies, so components install nothing at run time. The GPU pipeline runs
# its compute steps (inversion, sensitivity) on the CUDA one. A registry of your own is
# named at compile time: CROSSAUDIT_IMAGE=registry.example.com/crossaudit:0.1.0 (and
# CROSSAUDIT_GPU_IMAGE) when the pipelines are compiled (`python -m pipelines.audit_pipeline`).
BASE_IMAGE = os.environ.get("CROSSAUDIT_IMAGE", f"ghcr.io/crossaudit/crossaudit:{__version__}")
GPU_IMAGE = os.environ.get("CROSSAUDIT_GPU_IMAGE", f"ghcr.io/crossaudit/crossaudit-gpu:{__version__}")
