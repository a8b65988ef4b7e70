"""ESamp's bank figures as Prometheus gauges, beside SGLang's own (`--enable-metrics`).

Set from the scheduler process each time it streams outputs; SGLang's multiprocess
Prometheus registry (PROMETHEUS_MULTIPROC_DIR) carries them to its `/metrics` endpoint.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

GAUGES = {  # server_stats() key -> documentation
    "slots_total": "ESamp Distiller slots (all variants' banks).",
    "slots_used": "ESamp slots held by groups with running members.",
    "slots_retained": "ESamp slots kept by finished groups for later members.",
    "groups_allocated": "ESamp groups given a slot since start.",
    "groups_evicted": "ESamp groups that lost their slot since start.",
    "fallback_rows": "ESamp rows sampled plainly because the bank was full, since start.",
    "fallback_tokens": "ESamp tokens sampled plainly (bank full or no capture), since start.",
    "active_members": "Requests currently holding an ESamp group membership.",
}


class BankGauges:
    def __init__(self) -> None:
        from prometheus_client import Gauge  # after SGLang set PROMETHEUS_MULTIPROC_DIR

        self.gauges = {key: Gauge(f"esamp:{key}", doc, multiprocess_mode="mostrecent") for key, doc in GAUGES.items()}

    def update(self, stats: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            gauge.set(stats.get(key, 0))


_gauges: Optional[BankGauges] = None
_enabled: Optional[bool] = None


def publish(stats: Callable[[], dict[str, Any]]) -> None:
    """Set the gauges from `stats()` when the server runs with --enable-metrics (else a no-op)."""
    global _gauges, _enabled
    if _enabled is None:
        from sglang.srt.runtime_context import get_server_args

        _enabled = bool(get_server_args().enable_metrics)
    if not _enabled:
        return
    if _gauges is None:
        _gauges = BankGauges()
    _gauges.update(stats())
