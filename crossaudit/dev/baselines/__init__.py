"""Single-model backdoor detectors that crossaudit is benchmarked against."""
