"""Batch decoding of samples into arrays or dead letters, and position packing."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.codec import (
    DLQ_KINDS,
    Decoder,
    decode_batch,
    split_position,
    to_position,
)
from streamer.config import StreamConfig

CFG = StreamConfig(channels=["a", "b", "c"], max_message_bytes=512)


def sample(sensor: str = "s1", ts: object = 10.0, values: object = (1.0, 2.0, 3.0)) -> bytes:
    return orjson.dumps(
        {
            "sensor": sensor,
            "ts": ts,
            "values": list(values) if isinstance(values, tuple) else values,
        }
    )


# (value bytes, key, expected kind) of malformed messages, one per kind at least.
BAD: list[tuple[bytes | None, bytes | None, str]] = [
    (b"x" * 600, b"s1", "oversized"),
    (None, b"s1", "empty"),
    (b"", b"s1", "empty"),
    (b'{"sensor": "s1", "ts": 1,', b"s1", "bad_json"),
    (b"\xff\xfe", b"s1", "bad_json"),
    (b"[1, 2, 3]", b"s1", "not_object"),
    (b'"just a string"', b"s1", "not_object"),
    (b'{"sensor": "s1", "values": [1, 2, 3]}', b"s1", "missing_field"),
    (sample(sensor=""), b"", "bad_sensor"),
    (sample(sensor=7), b"7", "bad_sensor"),  # type: ignore[arg-type]
    (sample(sensor="s2"), b"s1", "key_mismatch"),
    (sample(), None, "key_mismatch"),
    (sample(ts="yesterday"), b"s1", "bad_timestamp"),
    (sample(ts=None), b"s1", "bad_timestamp"),
    (sample(ts=True), b"s1", "bad_timestamp"),
    (sample(values=(1.0, 2.0)), b"s1", "wrong_channel_count"),
    (sample(values={"a": 1, "b": 2, "zz": 3}), b"s1", "unknown_channel"),
    (sample(values={"a": 1, "b": 2}), b"s1", "missing_channel"),
    (sample(values="1,2,3"), b"s1", "wrong_type"),
    (sample(values=[1, "2", 3]), b"s1", "wrong_type"),
    (sample(values=[1, True, 3]), b"s1", "wrong_type"),
    (sample(values=[1, None, 3]), b"s1", "null_value"),
    (sample(values=None), b"s1", "null_value"),
    (b'{"sensor": "s1", "ts": 1, "values": [1, NaN, 3]}', b"s1", "non_finite"),
    (b'{"sensor": "s1", "ts": 1, "values": [1, 1e400, 3]}', b"s1", "non_finite"),
    (sample(values=[1, 1e39, 3]), b"s1", "non_finite"),
]


class TestDecodeValid:
    """Valid samples become arrays in batch order."""

    def test_list_and_object_values(self) -> None:
        """List values in channel order and object values by name decode alike."""
        vals = [
            sample("s1", 1.5, (1.0, 2.0, 3.0)),
            orjson.dumps({"sensor": "s2", "ts": 2, "values": {"c": 3, "a": 1, "b": 2}}),
        ]
        got, dead = decode_batch(vals, [b"s1", b"s2"], CFG, np.array([7, 9], dtype=np.int64))
        assert dead == []
        assert list(got.keys) == ["s1", "s2"]
        np.testing.assert_array_equal(got.ts, [1.5, 2.0])
        np.testing.assert_array_equal(got.values, [[1, 2, 3], [1, 2, 3]])
        assert got.values.dtype == np.float32
        np.testing.assert_array_equal(got.positions, [7, 9])
        np.testing.assert_array_equal(got.index, [0, 1])

    def test_iso_timestamps(self) -> None:
        """ISO-8601 strings with an offset, a Z, or none (UTC) give epoch seconds."""
        vals = [
            sample(ts="2025-11-27T00:00:00.25Z"),
            sample(ts="2025-11-27T01:00:00.25+01:00"),
            sample(ts="2025-11-27T00:00:00.25"),
        ]
        got, dead = decode_batch(vals, [b"s1"] * 3, CFG)
        assert dead == []
        np.testing.assert_array_equal(got.ts, [1764201600.25] * 3)

    def test_custom_field_names(self) -> None:
        """Field names come from the stream configuration."""
        cfg = StreamConfig(channels=["x"], sensor_field="id", timestamp_field="t", values_field="v")
        got, dead = decode_batch([b'{"id": "k", "t": 1, "v": [2]}'], [b"k"], cfg)
        assert dead == [] and got.values.tolist() == [[2.0]]


class TestDecodeInvalid:
    """Every malformed message becomes a dead letter of the right kind, never an exception."""

    @pytest.mark.parametrize(("value", "key", "kind"), BAD)
    def test_kind(self, value: bytes | None, key: bytes | None, kind: str) -> None:
        """A malformed message alone is reported with its kind and a reason."""
        got, dead = decode_batch([value], [key], CFG)
        assert len(got) == 0
        assert [(d.index, d.kind) for d in dead] == [(0, kind)]
        assert dead[0].reason
        assert kind in DLQ_KINDS

    def test_mixed_batch_keeps_every_valid_sample(self) -> None:
        """Bad messages between good ones cost only themselves, in both parse paths."""
        values: list[bytes | None] = []
        keys: list[bytes | None] = []
        expected_bad = {}
        for i, (v, k, kind) in enumerate(BAD):
            values.append(sample("s1", float(i)))
            keys.append(b"s1")
            expected_bad[len(values)] = kind
            values.append(v)
            keys.append(k)
        got, dead = decode_batch(values, keys, CFG)
        assert {d.index: d.kind for d in dead} == expected_bad
        assert got.index.tolist() == [i for i in range(len(values)) if i not in expected_bad]
        assert got.ts.tolist() == [float(i) for i in range(len(BAD))]

    def test_joined_values_do_not_merge(self) -> None:
        """A value holding two objects, or a string left open, is not split across messages."""
        two = sample() + b"," + sample()
        open_str = b'{"sensor": "s1", "ts": 1, "values": [1, 2, 3], "note": "abc'
        got, dead = decode_batch([two, sample(), open_str, b'"}'], [b"s1"] * 4, CFG)
        assert {d.index: d.kind for d in dead} == {0: "bad_json", 2: "bad_json", 3: "bad_json"}
        assert got.index.tolist() == [1]

    def test_empty_batch(self) -> None:
        """No messages give empty arrays of the right shape."""
        got, dead = Decoder(CFG).decode([], [])
        assert dead == [] and got.values.shape == (0, 3)


Fate = tuple[object, ...]


def fates(values: list[bytes | None], keys: list[bytes | None]) -> list[Fate]:
    """What became of each message: its sample (key, ts, values) or its dead letter."""
    got, dead = decode_batch(values, keys, CFG)
    out: list[Fate | None] = [None] * len(values)
    for row, i in enumerate(got.index.tolist()):
        out[i] = ("sample", got.keys[row], float(got.ts[row]), tuple(got.values[row].tolist()))
    for d in dead:
        out[d.index] = ("dead", d.kind, d.reason)
    assert None not in out
    return out  # type: ignore[return-value]


def assert_judged_alone(values: list[bytes | None], keys: list[bytes | None]) -> None:
    """Each message of the batch meets the fate it meets in a batch of its own."""
    alone = [fates([v], [k])[0] for v, k in zip(values, keys, strict=True)]
    assert fates(values, keys) == alone


# Messages crafted to be invalid alone but valid JSON when a batch is joined with "\n,":
# one holds two values, one ends inside an array, and the next one closes it.
TWO_VALUES = sample(ts=1.0) + b"\n," + b'{"note": 1}'
OPENS = b'{"sensor": "s1", "ts": 3, "values": [1, 2'
CLOSES = b"3]}"


class TestMessagesJudgedAlone:
    """No neighbour changes a message's fate: a batch decodes as its messages do alone."""

    def test_crafted_neighbours(self) -> None:
        """A valid sample after a two-value message keeps its fate; the crafted ones are lost."""
        values: list[bytes | None] = [TWO_VALUES, sample(ts=2.0), OPENS, CLOSES]
        keys: list[bytes | None] = [b"s1"] * 4
        result = fates(values, keys)
        assert result[1] == ("sample", "s1", 2.0, (1.0, 2.0, 3.0))
        assert [f[:2] for f in (result[0], result[2], result[3])] == [("dead", "bad_json")] * 3
        assert_judged_alone(values, keys)

    @pytest.mark.parametrize(
        "values",
        [
            pytest.param([TWO_VALUES, sample(ts=2.0)], id="two-values-then-valid"),
            pytest.param([sample(ts=2.0), TWO_VALUES], id="valid-then-two-values"),
            pytest.param([OPENS, CLOSES, sample(ts=2.0)], id="open-array-continued"),
            pytest.param([OPENS, b"3]}\n," + sample(ts=4.0)], id="continuation-adds-a-value"),
            pytest.param(
                [sample(ts=2.0), OPENS, CLOSES + b"\n," + sample(ts=4.0), sample(ts=5.0)],
                id="merge-and-split",
            ),
            pytest.param(
                [b'{"sensor": "s1", "ts": 6, "values": {"a": 1', b'"b": 2, "c": 3}}'],
                id="open-object-continued",
            ),
            pytest.param([b"[1, 2", b"3]", sample(ts=2.0)], id="open-top-level-array"),
        ],
    )
    def test_variants(self, values: list[bytes | None]) -> None:
        """Each message gets exactly the fate it gets decoded alone."""
        assert_judged_alone(values, [b"s1"] * len(values))

    @settings(max_examples=200, deadline=None)
    @given(data=st.data())
    def test_random_batches(self, data: st.DataObject) -> None:
        """Random mixes of valid, malformed and cut or glued messages decode as alone."""
        values: list[bytes | None] = []
        keys: list[bytes | None] = []
        for _ in range(data.draw(st.integers(1, 12), label="parts")):
            ts = float(len(values))
            part = data.draw(st.sampled_from(["valid", "bad", "cut", "glued"]), label="part")
            if part == "valid":
                values.append(sample(ts=ts))
            elif part == "bad":
                value, key, _kind = data.draw(st.sampled_from(BAD), label="bad")
                values.append(value)
                keys.append(key)
                continue
            elif part == "cut":  # one sample split into two neighbouring messages
                whole = sample(ts=ts)
                # Cut anywhere, or at a comma and drop it: the batch's own "\n," then
                # stands in for it, which is how a joined parse was fooled.
                commas = [i for i, b in enumerate(whole) if b == ord(",")]
                at = data.draw(st.sampled_from(commas) | st.integers(1, len(whole) - 1))
                drop = whole[at] == ord(",")
                values += [whole[:at], whole[at + drop :]]
                keys.append(b"s1")
            else:  # two samples glued into one message
                sep = data.draw(st.sampled_from([b"\n,", b",", b" "]), label="sep")
                values.append(sample(ts=ts) + sep + sample(ts=ts + 0.5))
            keys.append(b"s1")
        assert_judged_alone(values, keys)


class TestWholeBatchPath:
    """A batch of valid samples is checked as a whole; the result equals one-by-one decoding."""

    @staticmethod
    def batch(n: int, seed: int) -> tuple[list[bytes | None], list[bytes | None]]:
        rng = np.random.default_rng(seed)
        values: list[bytes | None] = []
        keys: list[bytes | None] = []
        for i in range(n):
            sensor = f"pump-{int(rng.integers(50))}-\u00e9"
            # Integers and floats, as producers write both, in timestamps and values.
            ts: object = int(rng.integers(1, 10**12)) if i % 3 == 0 else float(rng.random() * 1e9)
            vals = [int(v) if i % 2 else float(v) for v in rng.normal(0, 1e3, 3)]
            values.append(sample(sensor, ts, tuple(vals)))
            keys.append(sensor.encode())
        return values, keys

    def test_matches_per_message_checks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Same keys, timestamps, values and index as the per-message path, which it skips."""
        values, keys = self.batch(300, seed=1)

        def never(*_args: object) -> None:
            raise AssertionError("a valid batch must not be checked message by message")

        with monkeypatch.context() as m:
            m.setattr(Decoder, "_one", never)
            fast, fast_dead = Decoder(CFG).decode(values, keys)
        with monkeypatch.context() as m:
            m.setattr(Decoder, "_all_valid", lambda *_args: None)
            slow, slow_dead = Decoder(CFG).decode(values, keys)
        assert fast_dead == slow_dead == []
        assert fast.keys.tolist() == slow.keys.tolist()
        assert fast.ts.tobytes() == slow.ts.tobytes()
        assert fast.values.tobytes() == slow.values.tobytes()
        assert fast.index.tolist() == slow.index.tolist() == list(range(300))

    @pytest.mark.parametrize(("value", "key", "kind"), [b for b in BAD if b[0]])
    def test_one_bad_message_in_a_valid_batch(
        self, value: bytes | None, key: bytes | None, kind: str
    ) -> None:
        """Any malformed message sends the batch down the per-message path: only it is lost."""
        values, keys = self.batch(20, seed=2)
        values.insert(7, value)
        keys.insert(7, key)
        got, dead = decode_batch(values, keys, CFG)
        assert [(d.index, d.kind) for d in dead] == [(7, kind)]
        assert got.index.tolist() == [i for i in range(21) if i != 7]


class TestPositions:
    """Partition and offset share one int64."""

    def test_round_trip(self) -> None:
        """Packing then splitting returns partition and offset."""
        pos = to_position(np.array([0, 3, 1023]), np.array([0, 12345, (1 << 40) - 1]))
        assert [split_position(int(p)) for p in pos] == [(0, 0), (3, 12345), (1023, (1 << 40) - 1)]

    def test_two_ints_pack_as_the_arrays_do(self) -> None:
        """The scalar path (one state record's anchor) gives the arrays' position, as an int."""
        pairs = [(0, 0), (3, 12345), (1023, (1 << 40) - 1)]
        packed = to_position(np.array([p for p, _ in pairs]), np.array([o for _, o in pairs]))
        for (p, o), want in zip(pairs, packed.tolist(), strict=True):
            got = to_position(p, o)
            assert type(got) is int and got == want
