"""The worker's batch pipeline without a broker: the commit order of a batch, checked
with recording stand-ins for the sink's delivery, the state store, the engine and the
feed; and the start-up check of the Faust internals the worker uses. (The crash tests
of test_stream_e2e.py check the same order on the real broker.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from clickvec.stream.worker import faust_internals
from clickvec.stream.worker.config import StreamConfig
from clickvec.stream.worker.engine import BatchResult, Record, StateStore
from clickvec.stream.worker.feed import Batch
from clickvec.stream.worker.metrics import Metrics
from clickvec.stream.worker.pipeline import InFlight, Pipeline
from clickvec.stream.worker.sink import DeliveryError


class RecordingStore(StateStore):
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def get(self, user_id: str, record: Record) -> bytes | None:
        return None

    def put(self, user_id: str, value: bytes, record: Record) -> None:
        raise AssertionError("states are written as one batch")

    def put_many(self, states) -> None:
        self.calls.append(f"states written: {[uid for uid, _, _ in states]}")

    async def flush(self) -> None:
        await asyncio.sleep(0)
        self.calls.append("changelog flushed")


class RecordingFeed:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def ack(self, batch: Batch, records: list[Record]) -> None:
        self.calls.append(f"events acked: {[r.offset for r in records]}")


class RecordingEngine:
    @staticmethod
    def commit_states(result: BatchResult, store: StateStore) -> None:
        store.put_many(result.states)


def _pipeline(calls: list[str], fatal: list[BaseException] | None = None) -> Pipeline:
    store = RecordingStore(calls)
    return Pipeline(SimpleNamespace(), StreamConfig(), RecordingEngine(), store, None, None,
                    RecordingFeed(calls), Metrics(), on_fatal=(fatal if fatal is not None else []).append)


def _item(pipeline: Pipeline, delivered: asyncio.Future) -> InFlight:
    records = [Record(b"u1", b"{}", "clicks", 0, 7), Record(b"u2", b"{}", "clicks", 1, 3)]
    result = BatchResult(states=[("u1", b"s1", records[0]), ("u2", b"s2", records[1])], applied=2)
    pipeline.batches += 1
    pipeline.pending.hold(result, pipeline.batches)
    return InFlight(pipeline.batches, Batch(records), records, result, delivered, 0.0)


async def _spin(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_commit_order_outputs_states_changelog_acks():
    async def scenario() -> list[str]:
        calls: list[str] = []
        pipeline = _pipeline(calls)
        delivered = asyncio.get_running_loop().create_future()
        item = _item(pipeline, delivered)
        task = asyncio.ensure_future(pipeline.commit(item))
        await _spin()
        assert calls == [], "nothing may be written before the outputs are acknowledged"
        assert len(pipeline.pending) == 2
        calls.append("outputs acknowledged")
        delivered.set_result(None)
        await task
        assert len(pipeline.pending) == 0  # the states are in the store now
        return calls

    assert asyncio.run(scenario()) == [
        "outputs acknowledged",
        "states written: ['u1', 'u2']",
        "changelog flushed",
        "events acked: [7, 3]",
    ]


def test_refused_outputs_write_no_state_and_ack_nothing():
    async def scenario() -> tuple[list[str], list[BaseException]]:
        calls: list[str] = []
        fatal: list[BaseException] = []
        pipeline = _pipeline(calls, fatal)
        delivered = asyncio.get_running_loop().create_future()
        loop_task = asyncio.ensure_future(pipeline.store_loop())
        await pipeline.inflight.put(_item(pipeline, delivered))
        delivered.set_exception(DeliveryError("refused"))
        await asyncio.wait_for(loop_task, 5)  # the loop ends on the error (fail_stop in the worker)
        return calls, fatal

    calls, fatal = asyncio.run(scenario())
    assert calls == []
    assert len(fatal) == 1 and isinstance(fatal[0], DeliveryError)


def test_store_loop_commits_batches_in_order_and_counts_them():
    async def scenario() -> tuple[list[str], Pipeline]:
        calls: list[str] = []
        pipeline = _pipeline(calls)
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        loop_task = asyncio.ensure_future(pipeline.store_loop())
        await pipeline.inflight.put(_item(pipeline, first))
        await pipeline.inflight.put(_item(pipeline, second))
        second.set_result(None)  # the later batch's outputs are acknowledged first
        await _spin()
        assert calls == []
        first.set_result(None)
        await asyncio.wait_for(pipeline.inflight.join(), 5)
        loop_task.cancel()
        return calls, pipeline

    calls, pipeline = asyncio.run(scenario())
    assert calls == ["states written: ['u1', 'u2']", "changelog flushed", "events acked: [7, 3]"] * 2
    assert pipeline.metrics.registry.get_sample_value("clickvec_events_applied_total") == 4


# -- the start-up check of the Faust internals ----------------------------------------------

def test_installed_faust_has_what_the_worker_uses(tmp_path):
    import faust

    app = faust.App("internals-check", broker="kafka://127.0.0.1:1", store="rocksdb://",
                    datadir=str(tmp_path), web_enabled=False)
    assert faust_internals.missing_internals(app.consumer) == []
    faust_internals.check(app.consumer)  # does not exit


def test_missing_internal_stops_with_one_line_naming_it():
    class StandIn:
        pass

    consumer = StandIn()
    for name in faust_internals.CONSUMER_ATTRIBUTES:
        if name != "_acked_index":
            setattr(consumer, name, None)
    with pytest.raises(SystemExit) as exc:
        faust_internals.check(consumer)
    message = str(exc.value.code)
    assert "\n" not in message
    assert "StandIn._acked_index" in message and "_acked," not in message
    assert "faust-streaming 0.15.x" in message and "aiokafka 0.14.x" in message

    class OldFetcher:
        def __init__(self) -> None:
            self.max_wait = 1500

    class OldStore:
        pass

    gaps = faust_internals.missing_internals(consumer, store_class=OldStore,
                                             fetch_classes=[(OldFetcher, "_fetch_max_wait_ms")])
    assert gaps == ["StandIn._acked_index", "OldFetcher._fetch_max_wait_ms", "OldStore._db_for_partition"]
