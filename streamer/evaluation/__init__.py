"""Benchmark scoring: SKAB point-wise metrics and the Numenta Anomaly Benchmark scorer."""
