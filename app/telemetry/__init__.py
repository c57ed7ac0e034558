"""Telemetry the agents (and any OpenTelemetry client) report: spans and per-edge RED rollups."""
