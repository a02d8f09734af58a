"""One exception root for everything streamer raises on purpose."""

from __future__ import annotations


class StreamerError(Exception):
    """Root of every error streamer raises deliberately."""


class ConfigError(StreamerError):
    """The configuration is invalid; the message names the key and the reason."""


class DataError(StreamerError):
    """Input data (a CSV file, a window batch) is unusable; the message says which value."""


class InputError(StreamerError):
    """A file or directory the user named is missing or unusable (the CLI exits 2)."""


class CsvError(DataError, InputError):
    """A CSV file the user named cannot be read as one: the message names line and value."""


class CheckpointError(InputError):
    """A model checkpoint is missing, tampered with, pickled or incompatible."""


class InferenceError(StreamerError):
    """The inference worker failed; the original exception is chained as the cause."""


class KafkaError(StreamerError):
    """A Kafka operation failed in a way the daemon cannot recover from."""


class StateError(StreamerError):
    """A persisted state record is unknown or corrupt."""


class StaleStateError(StateError):
    """A state record is sound but was written for another model's calibration."""
