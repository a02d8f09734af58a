"""Helpers for tests against a secured LocalBroker: topics made and ACLs granted by an admin."""

from __future__ import annotations

import time

# NewTopic's and the ACL types' documented home; the stubs do not re-export them.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from tests.helpers import Timeout

TIMEOUT_S = 30.0


def allow(
    restype: ResourceType, name: str, operation: AclOperation, principal: str = "User:streamer"
) -> AclBinding:
    """An ALLOW ACL for ``principal`` on one literal resource, from any host."""
    return AclBinding(
        restype,
        name,
        ResourcePatternType.LITERAL,
        principal,
        "*",
        operation,
        AclPermissionType.ALLOW,
    )


def grant(admin: AdminClient, bindings: list[AclBinding], principal: str = "User:streamer") -> None:
    """Create the ACLs and wait until the broker's authorizer has them.

    CreateAcls returns once the controller committed them; the broker applies the
    metadata a moment later, and DescribeAcls answers from the broker's authorizer.
    """
    for future in admin.create_acls(bindings, request_timeout=TIMEOUT_S).values():
        future.result(timeout=TIMEOUT_S)
    wanted = {(b.restype, b.name, b.operation) for b in bindings}
    # None matches any name or host, as documented; the stubs only admit str.
    everything_of_streamer = AclBindingFilter(
        ResourceType.ANY,
        None,  # type: ignore[arg-type]
        ResourcePatternType.ANY,
        principal,
        None,  # type: ignore[arg-type]
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    timeout = Timeout(TIMEOUT_S)
    while True:
        found = admin.describe_acls(everything_of_streamer, request_timeout=TIMEOUT_S).result()
        if wanted <= {(b.restype, b.name, b.operation) for b in found}:
            return
        assert not timeout.expired, f"ACLs {wanted} not in force: {found}"
        time.sleep(0.05)


def revoke(admin: AdminClient, binding: AclBinding) -> None:
    """Delete one ACL and wait until the broker's authorizer no longer has it."""
    matching = AclBindingFilter(
        binding.restype,
        binding.name,
        binding.resource_pattern_type,
        binding.principal,
        binding.host,
        binding.operation,
        binding.permission_type,
    )
    for future in admin.delete_acls([matching], request_timeout=TIMEOUT_S).values():
        future.result(timeout=TIMEOUT_S)
    timeout = Timeout(TIMEOUT_S)
    while admin.describe_acls(matching, request_timeout=TIMEOUT_S).result():
        assert not timeout.expired, f"ACL {binding} still in force"
        time.sleep(0.05)


def create_topics(admin: AdminClient, *names: str) -> None:
    """Create one-partition topics and wait until each has a leader."""
    specs = [NewTopic(name, num_partitions=1, replication_factor=1) for name in names]
    futures = admin.create_topics(specs, operation_timeout=TIMEOUT_S, request_timeout=TIMEOUT_S)
    for future in futures.values():
        future.result(timeout=TIMEOUT_S)
    timeout = Timeout(TIMEOUT_S)
    while True:
        topics = admin.list_topics(timeout=max(timeout.remaining, 0.1)).topics
        if all(
            name in topics
            and topics[name].error is None
            and topics[name].partitions
            and all(p.leader >= 0 for p in topics[name].partitions.values())
            for name in names
        ):
            return
        assert not timeout.expired, f"topics {names} have no leaders"
        time.sleep(0.05)
