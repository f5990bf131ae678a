"""Periodic re-audits: a five-field cron schedule (minute hour day-of-month month day-of-week).

A promoted model is audited again on a schedule (default weekly), because thresholds are
recalibrated, peers are replaced by newer deliveries, and the audit itself improves: a
version that no longer passes loses the promotion alias (the gate revokes it). The same
expression drives the scheduler inside `crossaudit serve` and, prefixed with a seconds
field, a Kubeflow recurring run (`crossaudit schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

DEFAULT_CRON = "0 3 * * 1"
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))
_SEARCH_LIMIT = timedelta(days=366 * 5)


class CronError(ValueError):
    """The expression is not a five-field cron schedule; the message names the field."""


def _parse_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        spec, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if spec == "*":
                start, stop = low, high
            elif "-" in spec:
                start, stop = (int(v) for v in spec.split("-", 1))
            else:
                start = stop = int(spec)
        except ValueError as exc:
            raise CronError(f"{name}: {part!r} is not a number, range, list, step or *") from exc
        if step < 1 or not low <= start <= stop <= high:
            raise CronError(f"{name}: {part!r} is outside {low}-{high} (or has a step below 1)")
        values.update(range(start, stop + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    expression: str
    fields: tuple[frozenset[int], ...]
    restricted_days: tuple[bool, bool]

    @classmethod
    def parse(cls, expression: str) -> Cron:
        parts = expression.split()
        if len(parts) != len(_FIELDS):
            raise CronError(f"{expression!r}: expected 5 fields (minute hour day month weekday), got {len(parts)}")
        parts[4] = "0" if parts[4] == "7" else parts[4]
        fields = tuple(_parse_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True))
        return cls(expression, fields, (parts[2] != "*", parts[4] != "*"))

    def matches(self, moment: datetime) -> bool:
        minute, hour, day, month, weekday = self.fields
        if moment.minute not in minute or moment.hour not in hour or moment.month not in month:
            return False
        on_day, on_weekday = moment.day in day, (moment.weekday() + 1) % 7 in weekday
        if all(self.restricted_days):
            return on_day or on_weekday
        return on_day and on_weekday

    def next_after(self, moment: datetime) -> datetime:
        """The first matching minute strictly after `moment`."""
        candidate = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
        end = candidate + _SEARCH_LIMIT
        while candidate < end:
            if self.matches(candidate):
                return candidate
            candidate += timedelta(minutes=1)
        raise CronError(f"{self.expression!r} never fires")

    def kubeflow(self) -> str:
        """Kubeflow recurring runs take six fields, seconds first."""
        return f"0 {self.expression}"
