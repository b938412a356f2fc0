"""Diagnostics for background mode: service health, metrics, the HTTP server and sd_notify.

- ``health``: ``HealthRegistry``, the one source of truth for /readyz, /wait and the metrics.
- ``metrics``: Prometheus metrics fed by the registry (the only importer of prometheus_client).
- ``http``: the tbot-compatible diagnostics server (/livez, /readyz, /wait, /metrics).
- ``sdnotify``: systemd readiness, reload and watchdog notifications.

Only the daemon imports this package; the one-shot path never does, so nothing is
re-exported here and each caller imports exactly the module it needs.
"""
