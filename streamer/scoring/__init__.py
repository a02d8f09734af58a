"""Scoring: adaptive thresholds over window scores and the per-sensor alert state machine."""
