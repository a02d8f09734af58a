"""Tests of the Kafka layer against a real broker."""
