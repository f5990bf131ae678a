"""The `crossaudit` commands that run the KFP pipelines: `audit-version` and `schedule`.

They live with the pipelines, not in the library: `crossaudit`'s command line loads them
through the `crossaudit.commands` entry point (`pyproject.toml`), so that the library
never imports the KFP layer built on it. kfp and MLflow are imported when a command runs.
"""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("audit-version")(audit_version)
    app.command()(schedule)


def audit_version(
    uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION or models:/NAME@ALIAS")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI")],
    kfp_host: Annotated[str | None, typer.Option("--kfp-host", help="Submit to this Kubeflow Pipelines host")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    alias: Annotated[str, typer.Option("--alias", help="Promotion alias the gate may set")] = "production",
) -> None:
    """Audit a registered version against its peers through the pipeline (kfp.local, or a
    cluster with --kfp-host). Exit 0 passed, 1 failed, 2 anything else (or submitted)."""
    from pipelines.runner import audit_version as run_pipeline

    submission = run_pipeline(uri, tracking_uri, kfp_host, seed, device, alias)
    run = f" (KFP run {submission.kfp_run_id})" if submission.kfp_run_id else ""
    print(f"{submission.version.uri}: {submission.status}{run}; peers {', '.join(submission.peers) or 'none'}")
    raise typer.Exit({"passed": 0, "failed": 1}.get(submission.status, 2))


def schedule(
    kfp_host: Annotated[str, typer.Option("--kfp-host", help="Kubeflow Pipelines API, reachable from its pods")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI")],
    cron: Annotated[str, typer.Option("--cron", help="5-field cron (UTC)")] = "0 3 * * 1",
    alias: Annotated[str, typer.Option("--alias")] = "production",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (the GPU pipeline)")] = "cpu",
) -> None:
    """Create a Kubeflow recurring run that re-audits every promoted version."""
    from pipelines.runner import schedule_reaudits

    recurring_id = schedule_reaudits(kfp_host, cron, tracking_uri, alias, device)
    print(f"recurring run {recurring_id}: re-audit {alias!r} versions on '{cron}'")
