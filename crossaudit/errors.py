"""Named errors. Every one of them ends an audit as *inconclusive* (exit 2), never clean."""


class AuditError(Exception):
    """Base class: something made the audit impossible; the verdict fails closed."""


class ModelLoadError(AuditError):
    """A model file is malformed, too large, unsafe (pickle) or of an unknown format."""


class UnsupportedOpError(ModelLoadError):
    """The ONNX graph uses an operator the torch translation does not implement."""


class ParityError(ModelLoadError):
    """The torch translation does not reproduce ONNX Runtime's outputs."""


class DataValidationError(AuditError):
    """The audit data does not follow the contract (the message names the column), or is
    too small to measure a trigger's success on."""


class IncomparableModelsError(AuditError):
    """The two models disagree too much on clean data, or share no aligned layer."""


class TimeBudgetError(AuditError):
    """The audit ran past its time budget (CROSSAUDIT_TIME_BUDGET_S)."""


class IdenticalModelsError(IncomparableModelsError):
    """The witness is the suspect itself: the same bytes, or the same function."""


class WebhookRejectedError(Exception):
    """A delivery that must not be acted on; the message says why (answered with 401)."""
