"""Resource limits on what a provider or an auditor hands us: bounded, configurable, fail closed.

A model over `max_model_bytes` (its file and all its tensors, external data included), an
audit set over `max_audit_samples` or `max_audit_bytes` (decoded), or an audit
running past `time_budget_s` ends the audit *inconclusive*, never clean. Defaults suit a
laptop; an operator raises them with environment variables, which reach the CLI, every
pipeline component and the receiver's audits alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from crossaudit.modelio.data import DEFAULT_MAX_AUDIT_BYTES, DEFAULT_MAX_SAMPLES
from crossaudit.modelio.loaders import DEFAULT_MAX_MODEL_BYTES

ENV = {
    "max_model_bytes": "CROSSAUDIT_MAX_MODEL_BYTES",
    "max_audit_samples": "CROSSAUDIT_MAX_AUDIT_SAMPLES",
    "max_audit_bytes": "CROSSAUDIT_MAX_AUDIT_BYTES",
    "time_budget_s": "CROSSAUDIT_TIME_BUDGET_S",
}


@dataclass(frozen=True)
class Limits:
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    max_audit_samples: int = DEFAULT_MAX_SAMPLES
    max_audit_bytes: int = DEFAULT_MAX_AUDIT_BYTES
    time_budget_s: float = 1800.0

    @classmethod
    def from_env(cls) -> Limits:
        """The defaults, overridden by CROSSAUDIT_MAX_MODEL_BYTES, CROSSAUDIT_MAX_AUDIT_SAMPLES,
        CROSSAUDIT_MAX_AUDIT_BYTES and CROSSAUDIT_TIME_BUDGET_S; a value that is not a
        positive number is an error."""
        values: dict[str, float] = {}
        for name, variable in ENV.items():
            text = os.environ.get(variable)
            if text is None:
                continue
            kind = float if name == "time_budget_s" else int
            try:
                value = kind(text)
            except ValueError:
                value = 0
            if value <= 0:
                raise ValueError(f"{variable}={text!r}: expected a positive {kind.__name__}")
            values[name] = value
        return cls(**values)
