"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) for local use.

Development, the test suite, CI and ``streamer demo`` all run against a genuine
broker rather than a fake: the jars come from Maven Central through Maven (fetched
once into ``${STREAMER_CACHE:-~/.cache/streamer}/kafka/<version>/libs``) and run on
the local Java 17+, so no Docker and no download outside the package registries is
needed.

Library use::

    with LocalBroker() as broker:
        bootstrap = broker.start()

A secured broker, as a plant's cluster runs one (SASL_SSL with SCRAM-SHA-512 users,
optionally an mTLS listener, ACLs enforced by KRaft's StandardAuthorizer)::

    security = BrokerSecurity(users={"admin": "a-secret", "streamer": "s-secret"},
                              super_users=["admin"], mtls=True)
    with LocalBroker(security=security) as broker:
        broker.start()
        admin = AdminClient(broker.client_config("admin"))
        producer = Producer(broker.mtls_client_config("streamer"))

Command line (``python -m streamer.dev.broker``, also behind
``streamer broker``): ``fetch`` pre-fetches the jars, ``start`` launches a detached
broker and prints its bootstrap address, ``status`` prints it again, ``stop`` ends it.
"""

from __future__ import annotations

from streamer.dev.broker.cli import main
from streamer.dev.broker.jvm import DEFAULT_VERSION, LIBS_ENV, cache_root, ensure_jars
from streamer.dev.broker.pki import BrokerSecurity, ClientCertificate
from streamer.dev.broker.server import LocalBroker

__all__ = [
    "DEFAULT_VERSION",
    "LIBS_ENV",
    "BrokerSecurity",
    "ClientCertificate",
    "LocalBroker",
    "cache_root",
    "ensure_jars",
    "main",
]
