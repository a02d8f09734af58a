"""librdkafka settings in ``kafka.client``: known names, values read as librdkafka reads
them, and which ones are secrets.

The names, kinds and ranges come from ``streamer.librdkafka_properties``, a table
generated from the installed librdkafka (its module docstring says why a table and
not a throwaway client). Used by ``streamer.config`` when a config is loaded, so a
mis-spelled, mis-cased or mis-typed setting stops ``check-config`` and start-up with
the key named, before any client exists.
"""

from __future__ import annotations

import difflib
import math
import re

from streamer.librdkafka_properties import LIBRDKAFKA_VERSION, PROPERTIES

__all__ = [
    "CLIENT_ROLES",
    "MANAGED_CLIENT_KEYS",
    "SECRET_CLIENT_KEYS",
    "is_secret_client_key",
    "name_problem",
    "read_by",
    "setting_number",
    "value_problem",
]

# librdkafka keys whose values are secrets: never logged, never printed. Besides these,
# any key whose name holds a word of _SECRET_WORDS counts as secret, in any case.
SECRET_CLIENT_KEYS = frozenset(
    {
        "sasl.password",
        "sasl.oauthbearer.config",  # may carry clientSecret=... for the unsecured JWS mode
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.assertion.private.key.pem",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "ssl_key",
        "ssl.truststore.password",
    }
)
_SECRET_WORDS = ("password", "secret", "passphrase")
# Settings streamer sets itself (the daemon relies on their values).
MANAGED_CLIENT_KEYS = frozenset(
    {"bootstrap.servers", "group.id", "enable.auto.offset.store", "group.instance.id"}
)
# Where a managed setting is set instead, when streamer has a key of its own for it.
_MANAGED_BY = {"group.instance.id": "kafka.instance_id"}
# The scopes (librdkafka's C/P column) of the settings each kind of client reads. The
# admin client is a producer to librdkafka, but it produces nothing: it gets only the
# settings of every client (connection, security), none of either role's.
_SCOPES = {"consumer": ("C", "*"), "producer": ("P", "*"), "admin": ("*",)}
CLIENT_ROLES = frozenset(_SCOPES)


def read_by(role: str, key: str) -> bool:
    """Whether a client of ``role`` (consumer, producer or admin) reads setting ``key``.

    librdkafka warns at creation (CONFWARN) about every setting of the other role, so
    each client is handed only its own. An unknown name counts as read by every client.
    """
    prop = PROPERTIES.get(key)
    return prop is None or prop.scope in _SCOPES[role]


def is_secret_client_key(key: str) -> bool:
    """Whether a ``kafka.client`` key holds a secret, judged case-insensitively."""
    low = key.lower()
    return low in SECRET_CLIENT_KEYS or any(word in low for word in _SECRET_WORDS)


# Numbers written whole: librdkafka reads the longest leading number of a value (strtol
# with base 0, strtod) and ignores the rest, so "30s" is 30 ms, "010" is 8 and "1.5" is 1
# to it. Such values are refused here rather than read in part.
_INTEGER = re.compile(r"\s*[+-]?(?:0|[1-9][0-9]*)\s*")
_DECIMAL = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
# librdkafka's boolean words, compared in any case.
_C_BOOLS = frozenset({"true", "t", "1", "false", "f", "0"})
# Settings confluent-kafka reads itself, before librdkafka, and only as a YAML boolean.
_PYTHON_BOOLS = frozenset({"delivery.report.only.error"})


def _c_text(value: object) -> str:
    """The text confluent-kafka hands librdkafka for a YAML value (``str()`` of it)."""
    return value if isinstance(value, str) else str(value)


def setting_number(value: object, kind: str = "integer") -> float | None:
    """The number a setting's value states (``kind``: integer or float), or None.

    None unless the value is a number written whole: a YAML number (a whole one for an
    integer setting) or a string holding just a decimal one.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):  # float() of a huge int would raise: out of range anyway
        return float(value) if abs(value) < 1e300 else math.copysign(math.inf, value)
    if isinstance(value, float):
        ok = value.is_integer() if kind == "integer" else math.isfinite(value)
        return value if ok else None
    if isinstance(value, str) and (_INTEGER if kind == "integer" else _DECIMAL).fullmatch(value):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _plain(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def value_problem(key: str, value: object) -> str | None:
    """Why ``value`` does not fit the known setting ``key``; None when it does.

    Everything accepted here librdkafka accepts too (``tests/test_librdkafka_properties.py``
    checks that on every typed property). Booleans, enums and flag lists are read as
    librdkafka reads them; numbers must be written whole (see ``setting_number``), where
    librdkafka would read a leading part. Strings are not checked (paths, names,
    secrets): the client reports those it cannot use.
    """
    prop = PROPERTIES[key]
    if prop.kind == "string":
        return None
    if prop.kind == "api":
        return f"{key!r} is set through the client's API, not in a config file"
    if key in _PYTHON_BOOLS:
        return None if isinstance(value, bool) else f"{key!r} must be true or false"
    text = _c_text(value)
    if prop.kind in ("integer", "float"):
        number = setting_number(value, prop.kind)
        noun = "an integer" if prop.kind == "integer" else "a number"
        shown = f"{_plain(prop.low)} .. {_plain(prop.high)}"
        if number is None:
            return f"{key!r} must be {noun} in {shown}, got {value!r}"
        if not prop.low <= number <= prop.high:
            return f"{key!r} must be in {shown}, got {value!r}"
        return None
    if prop.kind == "boolean":
        if text.lower() not in _C_BOOLS:
            return f"{key!r} must be true or false, got {value!r}"
        return None
    words = {w.lower() for w in prop.words}
    if prop.kind == "enum":
        if text.lstrip().lower() not in words:
            return f"{key!r} must be one of {', '.join(prop.words)}; got {value!r}"
        return None
    items = {w.lstrip().lower() for w in text.split(",")} - {""}  # "a, b" but not "a ,b"
    if not text or not items <= words:
        return f"{key!r} must be a comma-separated list of {', '.join(prop.words)}; got {value!r}"
    return None


def name_problem(key: str) -> str | None:
    """Why ``key`` cannot be set in ``kafka.client``, or None.

    Unknown to librdkafka (names are case-sensitive: a mis-cased one is named with the
    right spelling), set by streamer itself, or settable only through a client API.
    """
    if key in _MANAGED_BY:
        return f"{key!r} is managed by streamer; set {_MANAGED_BY[key]} instead"
    if key in MANAGED_CLIENT_KEYS:
        return f"{key!r} is managed by streamer; set it elsewhere or not at all"
    prop = PROPERTIES.get(key)
    if prop is None:
        return _unknown(key)
    if prop.kind == "api":
        return f"{key!r} is set through the client's API, not in a config file"
    return None


def _unknown(key: str) -> str:
    """The refusal of a key librdkafka does not know, with the nearest known name."""
    lower = {name.lower(): name for name in PROPERTIES}
    near = [lower[key.lower()]] if key.lower() in lower else []
    near = near or difflib.get_close_matches(key, list(PROPERTIES), n=1, cutoff=0.8)
    if not near:
        hint = f"librdkafka {LIBRDKAFKA_VERSION} has no such property; names are case-sensitive"
    elif near[0] in MANAGED_CLIENT_KEYS:
        hint = f"did you mean {near[0]!r}? streamer sets that one itself"
    else:
        hint = f"did you mean {near[0]!r}?"
    return f"unknown librdkafka setting {key!r} ({hint})"
