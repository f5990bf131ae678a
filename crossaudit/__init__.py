"""crossaudit: backdoor audits of outsourced models by cross-examination."""

import os

# Provider artifacts are hostile: MLflow must never unpickle one, whichever module
# imports it first.
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")

__version__ = "0.1.0"
REPORT_SCHEMA_VERSION = "1"
