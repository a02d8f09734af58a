"""Kafka layer: consumer source, producer sink, admin helpers and a local broker for development."""
