"""Each Kafka client gets only the settings of its role; the consumer's group membership.

No broker needed: the settings are computed, and the static id's lock is a local file.
"""

from __future__ import annotations

import pytest

from streamer.client_settings import read_by
from streamer.config import KafkaConfig, parse_config
from streamer.errors import ConfigError
from streamer.kafka.membership import (
    HEARTBEAT_INTERVAL_MS,
    SESSION_TIMEOUT_MS,
    Membership,
    session_defaults,
)

CLIENT: dict[str, str | int | float | bool] = {
    "session.timeout.ms": 7000,  # consumer only (C)
    "heartbeat.interval.ms": 2000,  # C
    "auto.offset.reset": "latest",  # C
    "linger.ms": 5,  # producer only (P)
    "acks": -1,  # P
    "security.protocol": "plaintext",  # every client (*)
    "message.max.bytes": 2_000_000,  # *
}


class TestRoles:
    def test_the_table_knows_each_setting_s_clients(self) -> None:
        assert read_by("consumer", "session.timeout.ms")
        assert not read_by("producer", "session.timeout.ms")
        assert read_by("producer", "linger.ms")
        assert not read_by("consumer", "linger.ms")
        assert all(read_by(r, "security.protocol") for r in ("consumer", "producer", "admin"))

    def test_each_role_gets_its_own_and_the_shared_settings_only(self) -> None:
        cfg = parse_config({"kafka": {"client": CLIENT}}).kafka
        shared = {"security.protocol", "message.max.bytes"}
        assert set(cfg.librdkafka("consumer")) == shared | {
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "auto.offset.reset",
        }
        assert set(cfg.librdkafka("producer")) == shared | {"linger.ms", "acks"}
        assert set(cfg.librdkafka("admin")) == shared
        assert cfg.librdkafka() == CLIENT

    def test_the_static_id_is_set_through_its_own_key(self) -> None:
        with pytest.raises(ConfigError, match=r"group.instance.id.*kafka.instance_id"):
            parse_config({"kafka": {"client": {"group.instance.id": "a"}}})

    @pytest.mark.parametrize("bad", ["", "two words", "a/b", "x" * 201, 5])
    def test_a_bad_instance_id_names_the_key(self, bad: object) -> None:
        with pytest.raises(ConfigError, match=r"kafka\.instance_id"):
            parse_config({"kafka": {"instance_id": bad}})

    def test_instance_id_defaults_to_auto_and_may_be_null(self) -> None:
        assert parse_config({}).kafka.instance_id == "auto"
        assert parse_config({"kafka": {"instance_id": None}}).kafka.instance_id is None


class TestSession:
    def test_classic_gets_the_broker_minimum_unless_set(self) -> None:
        assert session_defaults({}) == {
            "session.timeout.ms": SESSION_TIMEOUT_MS,
            "heartbeat.interval.ms": HEARTBEAT_INTERVAL_MS,
        }
        assert session_defaults({"session.timeout.ms": 45000}) == {}
        assert session_defaults({"heartbeat.interval.ms": 1000}) == {
            "session.timeout.ms": SESSION_TIMEOUT_MS
        }

    def test_the_consumer_protocol_gets_none(self) -> None:
        # Its session is the broker's; librdkafka refuses these settings under it.
        assert session_defaults({"group.protocol": "consumer"}) == {}


class TestMembership:
    def test_auto_ids_are_distinct_while_held_and_stable_after(self, group_id: str) -> None:
        cfg = KafkaConfig(group_id=group_id)
        first, second = Membership(cfg), Membership(cfg)
        try:
            assert first.instance_id is not None and second.instance_id is not None
            assert first.instance_id != second.instance_id
            kept = first.instance_id
            first.release()  # as the kernel does when the process dies
            again = Membership(cfg)
            assert again.instance_id == kept  # a restart takes its predecessor's place
            again.release()
        finally:
            first.release()
            second.release()

    def test_other_groups_do_not_take_slots(self, group_id: str) -> None:
        one = Membership(KafkaConfig(group_id=group_id))
        other = Membership(KafkaConfig(group_id=group_id + "-other"))
        try:
            assert one.instance_id == other.instance_id  # ids are per group
        finally:
            one.release()
            other.release()

    def test_an_explicit_id_held_by_another_daemon_here_stops_start_up(self, group_id: str) -> None:
        cfg = KafkaConfig(group_id=group_id, instance_id="plant-a")
        held = Membership(cfg)
        try:
            assert held.instance_id == "plant-a"
            with pytest.raises(ConfigError, match=r"kafka.instance_id 'plant-a'.*another daemon"):
                Membership(cfg)
        finally:
            held.release()

    def test_null_is_a_dynamic_member(self) -> None:
        assert Membership(KafkaConfig(instance_id=None)).instance_id is None
