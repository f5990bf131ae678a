"""The cron schedule behind periodic re-audits, and the re-audit pipeline."""

from datetime import datetime

import pytest

from crossaudit.mlops.schedule import DEFAULT_CRON, Cron, CronError
from pipelines.reaudit_pipeline import COMPILED, compile_pipeline


def test_default_schedule_is_weekly_on_monday_at_three():
    cron = Cron.parse(DEFAULT_CRON)
    first = cron.next_after(datetime(2026, 11, 25, 12, 0))  # a Wednesday
    assert first == datetime(2026, 11, 30, 3, 0) and first.weekday() == 0
    assert cron.next_after(first) == datetime(2026, 12, 7, 3, 0)


def test_steps_lists_ranges_and_sunday_as_seven():
    assert Cron.parse("*/15 9-10 * * *").next_after(datetime(2026, 1, 1, 9, 50)) == datetime(2026, 1, 1, 10, 0)
    assert Cron.parse("0 0 * * 7").next_after(datetime(2026, 11, 25)) == datetime(2026, 11, 29)
    assert Cron.parse("30 6 1,15 * *").next_after(datetime(2026, 2, 2)) == datetime(2026, 2, 15, 6, 30)


def test_day_of_month_or_day_of_week_when_both_are_given():
    cron = Cron.parse("0 0 13 * 5")  # the 13th, or any Friday (cron's rule)
    assert cron.next_after(datetime(2026, 11, 25)) == datetime(2026, 11, 27)


@pytest.mark.parametrize(
    ("expression", "field"),
    [("* * * *", "5 fields"), ("61 * * * *", "minute"), ("* 24 * * *", "hour"), ("* * 0 * *", "day of month"),
     ("* * * 13 *", "month"), ("* * * * mon", "day of week"), ("*/0 * * * *", "minute")],
)  # fmt: skip
def test_bad_expressions_name_the_field(expression, field):
    with pytest.raises(CronError, match=field):
        Cron.parse(expression)


def test_kubeflow_gets_a_seconds_field():
    assert Cron.parse(DEFAULT_CRON).kubeflow() == "0 0 3 * * 1"


def test_compiled_reaudit_pipeline_yaml_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "reaudit_pipeline.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "run `python -m pipelines.reaudit_pipeline` and commit the YAML"
