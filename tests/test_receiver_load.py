"""1000 webhook deliveries (duplicates, replays, forged and stale ones mixed in) against a real receiver."""

import pytest

from benchmarks.webhook_load import MIX, run_burst


@pytest.mark.slow
def test_burst_audits_every_genuine_registration_exactly_once_and_rejects_the_rest(mlflow_server, tmp_path):
    burst = run_burst(mlflow_server, tmp_path)
    assert sum(burst.answers.values()) == sum(MIX.values()) == 1000
    assert burst.answers["genuine -> queued"] == MIX["genuine"]
    assert burst.answers["forged -> 401"] == MIX["forged"]
    assert burst.answers["stale -> 401"] == MIX["stale"]
    assert burst.answers["replayed -> duplicate"] == MIX["replayed"]
    assert burst.answers["redelivered -> ignored"] == MIX["redelivered"]
    assert set(burst.audited) == burst.genuine, "none lost, none invented (forged and stale ones start nothing)"
    assert set(burst.audited.values()) == {1}, "each exactly once"
