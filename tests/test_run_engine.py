"""The run engine's stages alone, without a cluster: plan, policy, ledger, journal, reduce,
outputs, and the rules that sort a failure into the data's, the user's or the facility's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hist
import numpy as np
import pytest
import uproot

from facility.errors import DataError, InfrastructureError, UsageError, UserCodeError
from facility.processing import policy, resident
from facility.processing.compare import differences, total_entries
from facility.processing.journal import CHECKPOINT_FILE, JOURNAL_FILE, Journal, replay
from facility.processing.ledger import ChunkLedger, LedgerError
from facility.processing.output import save_histograms
from facility.processing.plan import (
    Chunk,
    FileInfo,
    FileTask,
    checked_chunk_size,
    endpoint,
    plan_chunks,
)
from facility.processing.reader import raised_reading
from facility.processing.receipts import Failure, ReplicaFailure, replica_problem
from facility.processing.reduce import Holdings, ReduceError, Reducer
from facility.processing.runfolder import COMPLETE_MARKER, RunFolder

EAST, WEST = "root://east:1094//f.root", "root://west:1094//f.root"
TASK = FileTask("DY", "f.root", "Events", (EAST, WEST), 100)


def _failure(kind: str = "input", *problems: str) -> Failure:
    urls = [EAST, WEST]
    return Failure(kind, tuple(ReplicaFailure(urls[i], p, "why")  # type: ignore[arg-type]
                               for i, p in enumerate(problems)))


# -- plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [0, -5, True, 2.5])
def test_a_chunk_size_that_is_not_a_positive_count_is_refused(asked: Any) -> None:
    with pytest.raises(UsageError, match=r"chunk_size must be a positive number of events"):
        checked_chunk_size(asked, 250_000)


def test_chunk_size_none_means_the_configured_one() -> None:
    assert checked_chunk_size(None, 250_000) == 250_000
    assert checked_chunk_size(7, 250_000) == 7


def test_chunks_cover_the_file_once_on_cluster_boundaries() -> None:
    info = FileInfo(TASK, EAST, 100, (0, 30, 60, 90, 100))
    chunks = plan_chunks(info, 30)
    assert [(c.entry_start, c.entry_stop) for c in chunks] == [(0, 30), (30, 60), (60, 100)]
    assert sum(c.events for c in chunks) == 100


def test_a_chunk_never_splits_a_cluster() -> None:
    info = FileInfo(TASK, EAST, 100, (0, 50, 100))
    assert [(c.entry_start, c.entry_stop) for c in plan_chunks(info, 10)] == [(0, 50), (50, 100)]
    assert [(c.entry_start, c.entry_stop) for c in plan_chunks(info, 1000)] == [(0, 100)]


def test_chunk_ids_do_not_depend_on_the_replica_order() -> None:
    info = FileInfo(TASK, EAST, 100, ())
    swapped = FileInfo(TASK.ranked({endpoint(EAST)}), WEST, 100, ())
    assert swapped.task.urls == (WEST, EAST)
    assert [c.chunk_id for c in plan_chunks(info, 30)] == [c.chunk_id for c in
                                                             plan_chunks(swapped, 30)]


def test_ranking_moves_unhealthy_endpoints_last_and_keeps_the_rest() -> None:
    assert TASK.ranked(set()) is TASK
    assert TASK.ranked({"west:1094"}).urls == (EAST, WEST)
    assert TASK.ranked({"east:1094"}).urls == (WEST, EAST)


# -- classification -----------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "problem"), [
    (OSError("XRootD error: [FATAL] Connection error in file root://a//f.root"), "unavailable"),
    (OSError("XRootD error: [ERROR] Socket error in file root://a//f.root"), "unavailable"),
    (OSError("XRootD error: [ERROR] Operation expired in file root://a//f.root"), "unavailable"),
    (OSError("Cannot connect to host localhost:18094 ssl:default"), "unavailable"),
    (ConnectionRefusedError(111, "Connection refused"), "unavailable"),
    (TimeoutError("XRootD error: [ERROR] Operation expired"), "unavailable"),
    (ValueError("I/O operation on closed file"), "unavailable"),
    (FileNotFoundError("file not found: root://a//missing.root"), "damaged"),
    (ValueError("truncated: 100 bytes, the ROOT header says 200"), "damaged"),
    (KeyError("no tree 'Events' in the file"), "damaged"),
    (OSError("XRootD error: [ERROR] Server responded with an error: [3011] No such file"),
     "damaged"),
    (ValueError("unrecognized compression algorithm: b'\\x00\\x00' in file root://a//f.root"),
     "damaged"),
    (OSError("Failed to open file: [FATAL] TLS error: resource temporarily unavailable"),
     "unavailable"),
    (OSError("Cannot connect to host localhost:18094 ssl:True [SSLCertVerificationError: "
             "certificate verify failed: self-signed certificate in certificate chain]"),
     "unavailable"),
    (OSError("Failed to open file: [FATAL] Auth failed: No protocols left to try"), "refused"),
    (OSError("XRootD error: [ERROR] Server responded with an error: [3010] Unable to open "
             "/DY/DY_0000.root; permission denied"), "refused"),
    (OSError("403, message='Forbidden', url='https://localhost:18094/DY/DY_0000.root'"),
     "refused"),
])
def test_read_errors_are_sorted_into_unavailable_servers_refusals_and_damaged_replicas(
        error: BaseException, problem: str) -> None:
    assert replica_problem(error) == problem


def test_an_error_caused_by_a_lost_connection_counts_as_unavailable() -> None:
    high = ValueError("could not read basket")
    high.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    assert replica_problem(high) == "unavailable"


def _damaged_file(path: Path) -> None:
    """A small ROOT file whose only basket has its compressed bytes overwritten."""
    with uproot.recreate(path, compression=uproot.ZLIB(4)) as out:
        out.mktree("Events", {"x": np.int64}).extend({"x": np.arange(10_000, dtype=np.int64)})
    with uproot.open(path) as handle:
        branch = handle["Events"]["x"]
        seek = int(branch.member("fBasketSeek")[0])
    data = bytearray(path.read_bytes())
    data[seek + 100: seek + 400] = bytes(300)
    path.write_bytes(bytes(data))


def _raised(call: Any) -> BaseException:
    """The exception ``call`` raises, its traceback starting here (as the processor's frame
    does on a worker), not in the test that holds the file open."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 (whatever it raises is what the test looks at)
        return exc
    pytest.fail("expected an exception")


def test_an_error_reading_this_file_is_the_data_and_any_other_is_the_users_code(
        tmp_path: Path) -> None:
    path = tmp_path / "small.root"
    _damaged_file(path)
    with uproot.open(path) as handle:
        anchors = {id(handle), id(handle.file), id(handle.file.source)}
        tree = handle["Events"]
        reading = _raised(lambda: tree["x"].array(library="np"))
        typo = _raised(lambda: uproot.open(tmp_path / "corrections_typo.root"))
        assert raised_reading(reading.__traceback__, anchors)
        assert not raised_reading(typo.__traceback__, anchors)
        assert replica_problem(reading) == "damaged"


# -- policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("failure", "attempts", "damaged_on", "skip", "expected"), [
    (_failure("user"), 1, 0, True, ("fail", UserCodeError)),
    (_failure("killed-worker"), 1, 0, True, ("fail", UserCodeError)),
    (_failure("scheduler-lost"), 1, 0, True, ("fail", InfrastructureError)),
    (_failure("input", "unavailable", "unavailable"), 1, 0, True, ("retry", None)),
    (_failure("input", "unavailable", "unavailable"), 3, 0, True, ("fail", InfrastructureError)),
    (_failure("input", "damaged", "unavailable"), 3, 1, True, ("fail", InfrastructureError)),
    (_failure("input", "damaged", "damaged"), 1, 1, True, ("retry", None)),
    (_failure("input", "damaged", "damaged"), 2, 2, True, ("skip", None)),
    (_failure("input", "damaged", "damaged"), 2, 2, False, ("fail", DataError)),
    (_failure("input", "damaged", "damaged"), 3, 1, False, ("fail", DataError)),
])
def test_policy_skips_only_bad_data_and_names_who_must_act(
        failure: Failure, attempts: int, damaged_on: int, skip: bool,
        expected: tuple[str, type | None]) -> None:
    decision = policy.decide(failure, attempts=attempts, retries=2, skip_bad_input=skip,
                             damaged_on_workers=damaged_on)
    assert (decision.action, decision.error) == expected


def test_a_worker_is_a_blackhole_only_while_others_succeed() -> None:
    broken = policy.WorkerTally(done=0, failed=3)
    assert policy.is_blackhole(broken, 3, others_succeed=True)
    assert not policy.is_blackhole(broken, 3, others_succeed=False)
    assert not policy.is_blackhole(policy.WorkerTally(done=1, failed=9), 3, others_succeed=True)
    assert not policy.is_blackhole(policy.WorkerTally(done=0, failed=2), 3, others_succeed=True)


def test_failures_on_a_blackhole_worker_are_forgiven_and_it_is_retired_once() -> None:
    health = policy.Health(blackhole_failures=3)

    def on_broken_worker() -> Failure:
        return Failure("input", (ReplicaFailure(EAST, "unavailable", "socket error"),),
                       worker="tls://broken")

    assert health.failed("a", on_broken_worker()) == "counts"  # nobody has succeeded yet
    health.succeeded("tls://healthy")
    assert health.failed("b", on_broken_worker()) == "counts"
    assert health.failed("a", on_broken_worker()) == "retire"
    assert list(health.retired) == ["tls://broken"]
    assert health.failed("c", on_broken_worker()) == "forgiven"
    assert health.tries("a", 2) == 1
    assert health.avoid("a") == {"tls://broken"}
    assert health.unhealthy == {"east:1094"}
    damaged = Failure("input", (ReplicaFailure(EAST, "damaged", "bad"),
                                ReplicaFailure(WEST, "damaged", "bad")), worker="tls://healthy")
    assert health.failed("d", damaged) == "counts"
    assert health.damaged_on("d") == 1
    assert health.damaged == {EAST, WEST}


def test_messages_list_every_replica_with_its_reason() -> None:
    failure = _failure("input", "damaged", "unavailable")
    text = policy.unreachable_message("DY/f.root entries 0-10", failure, 3, "resume it")
    assert f"{EAST} (damaged): why" in text
    assert f"{WEST} (server unavailable): why" in text
    assert "not a problem of the file" in text


# -- ledger and reduce --------------------------------------------------------------------------


def test_a_chunk_is_settled_once_and_skipped_files_keep_their_events() -> None:
    ledger = ChunkLedger()
    chunk = Chunk(TASK, 0, 40, 100)
    ledger.add(chunk)
    assert ledger.settle_done(chunk.chunk_id, replica=EAST, worker="w", seconds=1.0)
    assert not ledger.settle_done(chunk.chunk_id, replica=WEST, worker="v", seconds=1.0)
    assert ledger.duplicates_refused == 1
    other = FileTask("DY", "g.root", "Events", (EAST,), 70)
    ledger.skip_file(other, "damaged")
    assert ledger.events("done") == 40
    assert ledger.events("skipped") == 70
    assert ledger.events("skipped", "TT") == 0
    with pytest.raises(LedgerError, match="planned twice"):
        ledger.add(chunk)


def test_the_reducer_refuses_to_merge_a_chunk_twice() -> None:
    reducer = Reducer()
    reducer.add(["a"], {"n": 1})
    reducer.add(["b"], {"n": 2})
    with pytest.raises(ReduceError, match="merged twice, first: b"):
        reducer.add(["b", "c"], {"n": 5})
    assert reducer.accumulator == {"n": 3}
    assert reducer.chunks == {"a", "b"}


def test_holdings_give_back_what_a_lost_worker_held_and_stay_lost() -> None:
    holdings = Holdings()
    assert holdings.hold("w1#1", "a")
    assert holdings.hold("w1#1", "b")
    assert holdings.hold("w2#7", "c")
    assert len(holdings) == 3
    assert holdings.take("w1#1", {"a", "z"}) == {"a"}
    assert holdings.lose("w2#7") == {"c"}
    assert not holdings.hold("w2#7", "d")  # whatever a lost worker holds never counts
    assert holdings.holders() == {"w1#1"}
    assert holdings.held_by("w1#1") == {"b"}


def test_a_worker_refuses_to_hold_a_chunk_twice() -> None:
    assert resident.absorb("run-x", ["a", "b"], {"n": 2})
    assert not resident.absorb("run-x", ["b", "c"], {"n": 2})
    assert resident.absorb("run-x", ["c"], {"n": 1})
    held = resident.collect("run-x")
    assert (held.chunks, held.output) == (frozenset({"a", "b", "c"}), {"n": 3})
    assert resident.collect("run-x").chunks == frozenset()
    resident.forget("run-x")


@pytest.mark.parametrize(("queued", "slots", "seconds", "wanted", "expected"), [
    (100_000, 2000, None, None, 8),    # a chunk's time is not known yet: as if it were a second
    (3_000, 2000, None, None, 2),      # ... and no more than each slot's share
    (100, 2, None, None, 1),           # ... and one a task where the slots are few
    (100, 10, 2.5, None, 1),           # a small cluster: one chunk a task
    (1_000, 2, 0.025, None, 10),       # ... unless a chunk is too short to be worth a task
    (12, 2, 0.025, 4, 3),              # ... and then still no more than each task's share
    (100_000, 2000, 1.0, None, 8),     # 2000 slots of 1 s chunks: 250 tasks a second
    (20_000, 2000, 1.0, 10, 8),        # a few tasks wanted, the queue deep: full bundles
    (4_000, 2000, 1.0, 10, 2),         # the queue's last chunks: no more than a slot's share
    (4_000, 2000, 1.0, 2000, 2),       # chunks handed back, every slot idle: spread over them
    (4_000, 2000, 1.0, 3001, 2),       # more tasks wanted than slots: the share of each
    (12, 2, 0.1, 1, 3),                # two slots, twelve chunks: a full bundle (0.25 s)
    (4, 2, 0.1, 1, 2),                 # ... but at the end no more than each slot's half
    (10_000_000, 100_000, 0.01, None, 64),  # never more than the limit
])
def test_bundles_keep_the_task_rate_bounded_and_the_tail_short(
        queued: int, slots: int, seconds: float | None, wanted: int | None,
        expected: int) -> None:
    assert policy.bundle_size(queued, slots, seconds, 250.0, 64, wanted) == expected


@pytest.mark.parametrize(("queued", "slots", "full", "expected"), [
    (1_000, 2, 3, 4),         # deep queue: one task a slot and spares
    (16_000, 2000, 8, 3001),
    (5, 2, 3, 2),             # the queue cannot give every slot a full bundle: no spares
    (15_999, 2000, 8, 2000),
    (0, 4, 1, 4),
])
def test_spares_only_while_every_slot_can_have_a_full_bundle(
        queued: int, slots: int, full: int, expected: int) -> None:
    assert policy.in_flight_target(queued, slots, full) == expected


def test_the_first_wave_ends_in_a_stream_from_the_first_chunk_on() -> None:
    """Bundles sent before any chunk's time is known have every size from one to twice the
    size asked for: the first result comes after one chunk, and on average they are as large
    as asked, so the task rate is as bounded as later."""
    sizes = [policy.staggered(8, number, first_wave=True) for number in range(15)]
    assert sorted(sizes) == list(range(1, 16))
    assert sum(sizes) / len(sizes) == 8
    later = [policy.staggered(8, number) for number in range(5)]
    assert min(later) > 1
    assert sum(later) / len(later) == 8


def test_a_yield_cuts_only_bundles_holding_more_than_their_share() -> None:
    resident.yield_chunks("run-y", 0, keep=3)
    assert resident.should_yield("run-y", 0, left=4)
    assert not resident.should_yield("run-y", 0, left=3)   # no more than its share: goes on
    assert not resident.should_yield("run-y", 1, left=40)  # made from what was handed back
    resident.yield_chunks("run-y", 1, keep=0)
    assert resident.should_yield("run-y", 0, left=1)
    assert resident.should_yield("run-y", 1, left=1)
    resident.yield_chunks("run-y", 0, keep=5)  # a late answer to an older yield changes nothing
    assert resident.should_yield("run-y", 1, left=1)
    resident.forget("run-y")
    assert not resident.should_yield("run-y", 0, left=10)


# -- journal ------------------------------------------------------------------------------------


def test_replay_trusts_the_checkpoint_and_ignores_a_torn_last_line(tmp_path: Path) -> None:
    journal = Journal.start(tmp_path, {"chunk_size": 10}, b"processor")
    journal.inspected({"file": "DY/f.root", "url": EAST, "entries": 100, "clusters": [0]})
    journal.checkpoint({"n": 3}, {"a", "b", "c"},
                       [{"chunk": c, "replica": EAST} for c in ("a", "b", "c")])
    journal.skipped({"chunk": "d", "file": "DY/f.root", "reason": "damaged"})
    journal.close()
    with open(tmp_path / JOURNAL_FILE, "a") as out:
        out.write('{"event": "done", "chunk": "e", "chec')  # the process died mid-line
    state = replay(tmp_path)
    assert state.chunks == {"a", "b", "c"}
    assert state.accumulator == {"n": 3}
    assert set(state.done) == {"a", "b", "c"}
    assert set(state.skipped) == {"d"}
    assert state.inspected["DY/f.root"]["entries"] == 100
    assert state.checkpoints == 1


def test_a_checkpoint_written_before_its_journal_lines_still_counts(tmp_path: Path) -> None:
    journal = Journal.start(tmp_path, {"chunk_size": 10}, b"processor")
    journal.checkpoint({"n": 1}, {"a"}, [{"chunk": "a"}])
    journal.close()
    lines = (tmp_path / JOURNAL_FILE).read_text().splitlines()
    journal = Journal(tmp_path, checkpoints=1)
    journal.checkpoint({"n": 2}, {"a", "b"}, [{"chunk": "b"}])
    journal.close()
    (tmp_path / JOURNAL_FILE).write_text("\n".join(lines) + "\n")  # died before the lines of b
    state = replay(tmp_path)
    assert state.chunks == {"a", "b"}
    assert state.accumulator == {"n": 2}
    assert (tmp_path / CHECKPOINT_FILE).exists()


# -- outputs ------------------------------------------------------------------------------------


def _every_storage() -> dict[str, hist.Hist]:
    made = {}
    for name, storage in {"int64": hist.storage.Int64(), "atomic": hist.storage.AtomicInt64(),
                          "double": hist.storage.Double(), "weight": hist.storage.Weight(),
                          "mean": hist.storage.Mean(), "wmean": hist.storage.WeightedMean(),
                          "unlimited": hist.storage.Unlimited()}.items():
        h = hist.Hist(hist.axis.Regular(4, 0, 4, name="x"), storage=storage)
        if name in ("mean", "wmean"):
            h.fill([0.5, 1.5, 1.5], sample=[1.0, 2.0, 4.0])
        else:
            h.fill([0.5, 1.5, 1.5, 9.0])
        made[name] = h
    return made


def test_every_storage_type_is_saved_and_reads_back(tmp_path: Path) -> None:
    result = {**_every_storage(),
              "four_axes": hist.Hist(*(hist.axis.Regular(2, 0, 1, name=n) for n in "wxyz"))}
    written, refused = save_histograms(result, tmp_path / "h.root")
    assert set(written) == set(_every_storage())
    assert refused == [{"histogram": "four_axes",
                        "reason": "4 axes: ROOT histograms have 1 to 3"}]
    with uproot.open(tmp_path / "h.root") as handle:
        for name, original in _every_storage().items():
            back = handle[name].to_hist()
            assert np.array_equal(back.values(flow=True), original.values(flow=True)), name


def test_outputs_interrupted_midway_are_never_read_as_a_result(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    (folder.path / "run.json").write_text("{}")

    def dies_halfway(staging: Path) -> None:
        (staging / "histograms.root").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        folder.publish(dies_halfway)
    assert not folder.complete
    assert not (folder.path / "histograms.root").exists()
    folder.publish(lambda staging: (staging / "summary.json").write_text("{}"))
    assert folder.complete
    assert json.loads((folder.path / COMPLETE_MARKER).read_text())["completed"]
    assert not (folder.path / ".outputs.incomplete").exists()


# -- comparing results --------------------------------------------------------------------------


def test_results_compare_bin_by_bin() -> None:
    first = _every_storage()
    second = _every_storage()
    assert differences(first, second) == []
    second["weight"].fill([2.5])
    assert differences(first, second) == ["result/weight.value: 1 bins differ",
                                          "result/weight.variance: 1 bins differ"]
    assert total_entries(second) - total_entries(first) == 1.0
