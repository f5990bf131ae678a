"""KFP v2 components: one folder per audit stage, each a thin shell over one library call
(`crossaudit.steps`, `crossaudit.gate` or `crossaudit.registry`)."""

# The project image from images/Dockerfile: crossaudit and its pinned dependencies,
# so components install nothing at run time.
BASE_IMAGE = "ghcr.io/crossaudit/crossaudit:0.1.0"
