"""Pure metric functions (filled in by the metric-core work)."""
