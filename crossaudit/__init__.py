"""crossaudit: backdoor audits of outsourced models by cross-examination."""

__version__ = "0.1.0"
REPORT_SCHEMA_VERSION = "1"
