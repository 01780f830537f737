"""Metrics of a run and its report (markdown + plots)."""
