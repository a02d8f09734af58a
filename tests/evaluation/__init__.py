"""Tests of the benchmark scoring code."""
