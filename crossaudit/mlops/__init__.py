"""The registry side: MLflow versions and tags (`registry`), the signed verdict (`attestation`),
promotion and the alias guard (`promotion`), the gate and the pipeline's compute steps
(`gate`, `steps`, `artifacts`), the webhook receiver and its queue (`receiver`, `webhook`,
`event_queue`), the operator's configuration and the re-audit schedule."""
