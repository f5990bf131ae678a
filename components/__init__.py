"""KFP v2 components: one folder per audit stage, each a thin shell over one library call
(`crossaudit.steps`, `crossaudit.gate` or `crossaudit.registry`)."""

# The project images from images/Dockerfile and images/Dockerfile.gpu: crossaudit and its
# pinned dependencies, so components install nothing at run time. The GPU pipeline runs
# its compute steps (inversion, sensitivity) on the CUDA one.
BASE_IMAGE = "ghcr.io/crossaudit/crossaudit:0.1.0"
GPU_IMAGE = "ghcr.io/crossaudit/crossaudit-gpu:0.1.0"
