"""Shared sessions in one process: the owner's API, its manager, threads and asyncio.

The in-process semantics are proven by test_visual_input.py and test_subscription.py,
which run on shared sessions too (ALSO_SHARED); other processes are
test_shared_processes.py's.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import pickle
import queue
import threading
import uuid

import numpy as np
import pytest

import capsule_sessions as cs
from capsule_sessions import SessionExistsError, SessionNotFoundError, Subscription, SubscriptionClosed

shm = pytest.importorskip("capsule_sessions._shm")
pytestmark = pytest.mark.cython


def ours(namespace: str) -> list[str]:
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(f"capsule.{namespace}."))


@pytest.fixture
def namespace():
    ns = f"t-{uuid.uuid4().hex[:12]}"
    yield ns
    gc.collect()
    assert ours(ns) == [], "a test left shared memory behind"


@pytest.fixture
def manager(namespace):
    with cs.SessionManager(8, shared=namespace, backend="cython", cleanup_interval=None) as m:
        yield m


def frame(seq: int, size: int = 64) -> np.ndarray:
    return np.full(size, seq % 251, dtype=np.uint8)


def test_a_shared_session_is_listed_attachable_and_gone_after_delete(manager, namespace):
    cam = manager.create("cam-1")
    assert cam.shared == namespace
    assert cs.list_shared(namespace) == ["cam-1"]
    assert cam.store_frame(frame(1), source="c", max_recent=2, frame_seq=1)
    reader = cs.attach("cam-1", namespace=namespace)
    assert [f.frame_seq for f in reader.latest_visual_frames(10)] == [1]
    manager.delete("cam-1")
    assert reader.closed
    assert cs.list_shared(namespace) == []
    with pytest.raises(SessionNotFoundError):
        cs.attach("cam-1", namespace=namespace)
    # The control name is gone; the data stays while a reader is attached (it may still
    # map a queued frame by name), and the last reader to leave unlinks it.
    assert [e for e in ours(namespace) if e.count(".") == 2] == []
    assert ours(namespace) != []
    del reader
    gc.collect()
    assert ours(namespace) == []


def test_the_same_id_cannot_be_shared_twice(manager, namespace):
    manager.create("cam-1")
    with pytest.raises(SessionExistsError, match="already shared"):
        cs.Session("cam-1", backend="cython", shared=namespace)


def test_ids_that_are_not_plain_names_are_hashed_into_the_segment_name(manager, namespace):
    odd = "rooms/../cam 1 é"
    cam = manager.create(odd)
    assert cam.store_frame(frame(7), source="c", max_recent=1, frame_seq=7)
    (entry,) = [e for e in ours(namespace) if e.count(".") == 2]  # the control segment
    assert "/" not in entry and ".." not in entry and entry.split(".")[2].startswith("~")
    assert cs.list_shared(namespace) == [odd]
    assert cs.attach(odd, namespace=namespace).latest_visual_frames(10)[0].frame_seq == 7


def test_a_session_dropped_without_delete_unlinks_its_names(namespace):
    s = cs.Session("lonely", backend="cython", shared=namespace)
    s.store_frame(frame(1, 100_000), source="c", max_recent=1)
    assert len(ours(namespace)) == 2  # control + one data segment
    del s
    gc.collect()
    assert ours(namespace) == []


def test_segments_are_owner_only(manager, namespace):
    cam = manager.create("cam-1")
    cam.store_frame(frame(1), source="c", max_recent=1)
    for entry in ours(namespace):
        assert os.stat(f"/dev/shm/{entry}").st_mode & 0o777 == 0o600


def test_subscriptions_are_the_public_class_and_refuse_copies(manager):
    sub = manager.create("cam-1").subscribe_visual_frames(2)
    assert isinstance(sub, Subscription)
    with pytest.raises(TypeError):
        pickle.dumps(sub)
    with pytest.raises(TypeError):
        type(sub)()


def test_frames_are_read_only_views_and_outlive_the_session(manager):
    cam = manager.create("cam-1")
    cam.store_frame(frame(3, 4096), source="c", max_recent=1, frame_seq=3)
    (held,) = cam.latest_visual_frames(10)
    assert not held.data.flags.writeable
    with pytest.raises(ValueError):
        held.data[0] = 1
    manager.delete("cam-1")
    gc.collect()
    assert held.data.tobytes() == frame(3, 4096).tobytes()


def test_past_the_lease_budget_frames_are_copied_out_and_counted(manager):
    cam = manager.create("cam-1")
    sub = cam.subscribe_visual_frames(shm.MAX_QUEUE)
    held = []
    for seq in range(shm.LEASE_BUDGET + 5):
        cam.store_frame(frame(seq), source="c", max_recent=1, frame_seq=seq)
        held.append(sub.get_nowait())
    assert cam.shared_stats()["copied_out"] == 5
    assert [f.data[0] for f in held] == [seq % 251 for seq in range(shm.LEASE_BUDGET + 5)]
    for f in held:
        assert not f.data.flags.writeable


def test_shared_stats_counts_readers_subscriptions_and_buffers(manager, namespace):
    cam = manager.create("cam-1")
    cam.store_frame(frame(1, 10_000), source="c", max_recent=2)
    reader = cs.attach("cam-1", namespace=namespace)
    sub = reader.subscribe_visual_frames(1)
    stats = cam.shared_stats()
    assert stats["readers"] == 2 and stats["subscriptions"] == 1  # the owner reads through a handle too
    assert stats["buffers"] == 1 and stats["buffer_bytes"] >= 10_000
    assert reader.shared_stats()["subscriptions"] == 1
    sub.close()
    del sub
    gc.collect()
    assert cam.shared_stats()["subscriptions"] == 0
    with pytest.raises(ValueError, match="not shared"):
        cs.Session("x", backend="cython").shared_stats()


def test_a_resolution_change_gets_new_buffers_and_drops_the_old(manager):
    cam = manager.create("cam-1")
    for size in (1 << 20, 4 << 20, 64 << 10):
        for seq in range(6):
            cam.store_frame(frame(seq, size), source="c", max_recent=2)
        (last,) = cam.latest_visual_frames(10)[-1:]
        assert last.nbytes == size
        del last
        # The pool is trimmed at a store: the next one lets the old size's buffers go.
        cam.store_frame(frame(0, size), source="c", max_recent=2)
        stats = cam.shared_stats()
        # ring + spare pool, sized for the current frames (the old ones were unlinked).
        assert stats["buffer_bytes"] <= 8 * (size + (64 << 10)), stats


def test_a_reader_blocked_in_get_wakes_when_the_session_ends(manager):
    cam = manager.create("cam-1")
    sub = cam.subscribe_visual_frames(2)
    outcome = []

    def read():
        try:
            outcome.append(sub.get(timeout=10))
            sub.get(timeout=10)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=read)
    t.start()
    cam.store_frame(frame(1), source="c", max_recent=1, frame_seq=1)
    manager.delete("cam-1")
    t.join(5)
    assert not t.is_alive()
    assert outcome[0].frame_seq == 1 and isinstance(outcome[1], SubscriptionClosed)


def test_asyncio_readers_wake_on_a_store_from_another_thread(manager):
    cam = manager.create("cam-1")
    sub = cam.subscribe_visual_frames(4)

    async def main():
        got = []
        timer = threading.Timer(0.05, lambda: [cam.store_frame(frame(s), source="c", max_recent=1, frame_seq=s)
                                               for s in range(3)])
        timer.start()
        async for f in sub:
            got.append(f.frame_seq)
            if len(got) == 3:
                break
        with pytest.raises(queue.Empty):
            await sub.aget(timeout=0.05)
        manager.delete("cam-1")
        with pytest.raises(SubscriptionClosed):
            await sub.aget(timeout=5)
        return got

    assert asyncio.run(main()) == [0, 1, 2]


def test_threads_storing_and_reading_at_once_balance_the_books(manager):
    cam = manager.create("cam-1")
    subs = [cam.subscribe_visual_frames(2, policy=p) for p in ("drop_newest", "drop_oldest")]
    stop = threading.Event()
    received = {id(s): [] for s in subs}

    def store(base):
        for seq in range(base, base + 300):
            cam.store_frame(frame(seq, 1000 + seq % 7 * 5000), source="c", max_recent=3, frame_seq=seq)

    def read(sub):
        while not stop.is_set():
            try:
                f = sub.get(timeout=0.05)
            except queue.Empty:
                continue
            assert (f.data == f.frame_seq % 251).all()
            received[id(sub)].append(f.frame_seq)
        del f

    readers = [threading.Thread(target=read, args=(s,)) for s in subs]
    writers = [threading.Thread(target=store, args=(base,)) for base in (0, 1000, 2000)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join(30)
    stop.set()
    for t in readers:
        t.join(30)
    accepted = cam.visual_stats()["accepted"]
    assert accepted == 900
    for sub in subs:
        while True:
            try:
                received[id(sub)].append(sub.get_nowait().frame_seq)
            except queue.Empty:
                break
        assert sub.delivered == len(received[id(sub)])
        assert sub.delivered + sub.dropped == accepted


def test_a_loan_is_published_where_it_was_written(manager, namespace):
    cam = manager.create("cam-1")
    reader = cs.attach("cam-1", namespace=namespace)
    sub = reader.subscribe_visual_frames(2)
    with cam.loan_frame(6 * 4 * 3) as loan:
        view = loan.as_array((6, 4, 3))
        written_at = view.__array_interface__["data"][0]
        np.copyto(view, np.arange(72, dtype=np.uint8).reshape(6, 4, 3)[..., ::-1])
        del view
        assert loan.commit(source="c", max_recent=1, width=4, height=6, mime_type="video/x-raw-rgb")
    (own,) = cam.latest_visual_frames(10)
    assert own.data.__array_interface__["data"][0] == written_at  # no copy
    got = sub.get(timeout=1)
    assert got.as_array((6, 4, 3)).tolist() == np.arange(72, dtype=np.uint8).reshape(6, 4, 3)[..., ::-1].tolist()
    assert (got.width, got.height, got.mime_type) == (4, 6, "video/x-raw-rgb")


def test_a_loan_cancelled_while_a_view_lives_never_reaches_a_frame(manager):
    cam = manager.create("cam-1")
    loan = cam.loan_frame(4096)
    kept = loan.array
    loan.cancel()
    kept[:] = 7  # writes into memory no frame will ever use
    for seq in range(20):
        cam.store_frame(frame(seq, 4096), source="c", max_recent=4, frame_seq=seq)
    assert all((f.data == f.frame_seq % 251).all() for f in cam.latest_visual_frames(10))


def test_a_long_source_moves_a_loan_to_a_bigger_buffer(manager):
    cam = manager.create("cam-1")
    loan = cam.loan_frame(100)
    loan.array[:] = 9
    long_source = "s" * 5000
    assert loan.commit(source=long_source, max_recent=1)
    (f,) = cam.latest_visual_frames(10)
    assert f.source == long_source and f.data.tolist() == [9] * 100


def test_a_forked_child_of_the_owner_refuses_to_store(manager):
    cam = manager.create("cam-1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a second writer would corrupt the session
        try:
            cam.store_frame(frame(1), source="c", max_recent=1)
            os.write(write, b"stored")
        except RuntimeError as exc:
            os.write(write, b"refused" if "fork" in str(exc) else str(exc).encode())
        finally:
            # As a child that ends normally: its exit handlers and collector must leave
            # the parent's session alone.
            reader = cs.attach("cam-1", namespace=cam.shared)
            del reader
            cs.shared._shm._end_live_rings()
            cs.shared._shm._leave_live_slots()
            os._exit(0)
    os.close(write)
    assert os.read(read, 100) == b"refused"
    os.close(read)
    os.waitpid(pid, 0)
    assert cam.store_frame(frame(2), source="c", max_recent=1)  # the owner itself is unaffected
    assert cs.list_shared(cam.shared) == ["cam-1"]
    assert cam.shared_stats()["readers"] == 1


@pytest.fixture
def large_copy():
    """``large_copy(method)`` pins the copy of large stores to one method (_stream_copy.h);
    the measured choice is back after the test."""
    shm = pytest.importorskip("capsule_sessions._shm")
    yield shm._force_large_copy
    shm._force_large_copy(None)


LARGE_COPIES = ["memcpy", "stream", "memcpy_split", "stream_split"]


@pytest.mark.parametrize("method", LARGE_COPIES)
@pytest.mark.parametrize("offset, extra", [(0, 0), (1, 1), (13, 63), (63, 65), (32, 4095)])
def test_large_frames_arrive_byte_for_byte_whichever_copy(manager, namespace, large_copy, method, offset, extra):
    """From STREAM_COPY_MIN_BYTES on, a store copies with non-temporal stores (an
    unaligned head, whole 64-byte lines and a tail) or memcpy, alone or split with a
    helper thread, whichever measures cheapest: every byte lands whatever the source's
    alignment and the size's remainder."""
    from capsule_sessions._limits import STREAM_COPY_MIN_BYTES
    from capsule_sessions._shm import _large_copy_state

    large_copy(method)
    used = _large_copy_state()[method]["copies"]
    size = STREAM_COPY_MIN_BYTES + extra
    backing = np.random.default_rng(offset).integers(0, 256, size + 64, dtype=np.uint8)
    source = backing[offset:offset + size]
    cam = manager.create("big")
    reader = cs.attach("big", namespace=namespace)
    try:
        for seq in range(3):  # the third store rewrites a buffer the ring let go
            source[:8] = seq
            assert cam.store_frame(source, source="c", max_recent=2, frame_seq=seq)
        for seen in (cam.latest_visual_frames(10), reader.latest_visual_frames(10)):
            assert [f.frame_seq for f in seen] == [1, 2]
            assert bytes(seen[-1].data) == source.tobytes()
    finally:
        reader.close()
    assert _large_copy_state()[method]["copies"] == used + 3


def test_the_large_copy_policy_runs_each_method_then_keeps_the_cheapest_and_tries_the_others():
    """_stream_copy.h's choice: a run of 32 copies of each method first, then the
    cheapest, and once every 2048 copies a run of 32 of each other one; a run's first
    half is not timed, nor the cheapest's first 16 copies after the others' runs (the
    destinations are still in the other method's cache state)."""
    shm = pytest.importorskip("capsule_sessions._shm")
    pick = shm._pick_large_copy
    run, period = 32, 2048
    unmeasured = dict.fromkeys(LARGE_COPIES, 0)
    assert [pick(call, unmeasured) for call in range(4 * run)] == [
        (LARGE_COPIES[call // run], call % run >= run // 2) for call in range(4 * run)]
    for cheap in LARGE_COPIES:
        costs = {name: 100 if name == cheap else 200 + i for i, name in enumerate(LARGE_COPIES)}
        others = [name for name in LARGE_COPIES if name != cheap]
        # Right after the first runs: the cheapest, timed once it made half a run.
        assert [pick(4 * run + i, costs) for i in range(run)] == [(cheap, i >= run // 2) for i in range(run)]
        assert pick(5000, costs) == (cheap, True)
        assert [pick(4 * period + i, costs) for i in range(3 * run + run)] == (
            [(others[i // run], i % run >= run // 2) for i in range(3 * run)]
            + [(cheap, i >= run // 2) for i in range(run)])


def test_a_copy_method_is_timed_only_after_half_a_run_of_it_in_a_row(manager, large_copy):
    """The first copies after a change of method find the destinations in the last
    method's cache state (_stream_copy.h): whatever the policy's phase, a method's first
    16 copies in a row are not timed."""
    from capsule_sessions._limits import STREAM_COPY_MIN_BYTES
    from capsule_sessions._shm import _large_copy_state

    frame = np.zeros(STREAM_COPY_MIN_BYTES, dtype=np.uint8)
    cam = manager.create("big")
    large_copy("memcpy")
    # Into the part of a period where the policy times every copy of the cheapest.
    while not 200 <= _large_copy_state()["calls"]["copies"] % 2048 < 1900:
        assert cam.store_frame(frame, source="c", max_recent=2)
    for _ in range(20):
        assert cam.store_frame(frame, source="c", max_recent=2)
    large_copy("stream")
    before = _large_copy_state()["stream"]
    for _ in range(24):
        assert cam.store_frame(frame, source="c", max_recent=2)
    after = _large_copy_state()["stream"]
    assert (after["copies"] - before["copies"], after["timed"] - before["timed"]) == (24, 24 - 16)


@pytest.mark.parametrize("dst", [0, 1, 63, 64, 4096 + 17])
@pytest.mark.parametrize("n", [1, 64, 128 * 1024, 128 * 1024 + 1, 4 * 1024 * 1024 + 4097, 6_220_800])
def test_a_split_copy_is_cut_into_chunks_that_tile_it_on_whole_lines(dst, n):
    """A split copy's chunks (_stream_copy.h), which the storing thread and the helper
    take in turn, cover every byte once, in order, each at most 128 KiB past the unaligned
    head, and every boundary inside the copy is on a 64-byte line of the destination."""
    shm = pytest.importorskip("capsule_sessions._shm")
    chunks = shm._split_chunks(dst, n)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    assert all(start < end for start, end in chunks)
    assert all((dst + start) % 64 == 0 for start, _ in chunks[1:])
    head = -dst % 64
    assert all(end - start <= 128 * 1024 + (head if k == 0 else 0) for k, (start, end) in enumerate(chunks))
    assert len(chunks) == max(1, -(-(n - min(head, n)) // (128 * 1024)))


@pytest.mark.parametrize("method", ["memcpy_split", "stream_split"])
def test_the_helper_copies_chunks_of_split_copies(manager, large_copy, method):
    """The helper thread takes part: within a few stores (at most 5 s, so a busy
    machine only makes it slower) it has copied chunks of a split, and every frame
    is whole."""
    import time

    from capsule_sessions._limits import STREAM_COPY_MIN_BYTES
    from capsule_sessions._shm import _large_copy_state

    large_copy(method)
    source = np.random.default_rng(3).integers(0, 256, 2 * STREAM_COPY_MIN_BYTES + 13, dtype=np.uint8)
    cam = manager.create("big")
    helped = _large_copy_state()["split_helped"]["chunks"]
    deadline = time.monotonic() + 5.0
    seq = 0
    while _large_copy_state()["split_helped"]["chunks"] == helped:
        assert time.monotonic() < deadline, "the helper never copied a chunk"
        seq += 1
        source[:8] = seq % 256
        assert cam.store_frame(source, source="c", max_recent=2, frame_seq=seq)
        assert bytes(cam.latest_visual_frames(10)[-1].data) == source.tobytes()


@pytest.mark.parametrize("method", ["memcpy_split", "stream_split"])
def test_split_copies_from_threads_at_once_each_land_whole(manager, large_copy, method):
    """One helper thread serves one split at a time: a store that finds it busy copies
    alone (counted), and every frame is whole either way."""
    import threading

    from capsule_sessions._limits import STREAM_COPY_MIN_BYTES
    from capsule_sessions._shm import _large_copy_state

    large_copy(method)
    size = STREAM_COPY_MIN_BYTES + 4097
    cams = [manager.create(f"big{i}") for i in range(2)]
    sources = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(2)]
    before = _large_copy_state()
    failures: list = []

    def store(i):
        try:
            for seq in range(20):
                sources[i][:8] = seq
                assert cams[i].store_frame(sources[i], source="c", max_recent=2, frame_seq=seq)
                [*_, last] = cams[i].latest_visual_frames(10)
                assert last.frame_seq == seq and bytes(last.data) == sources[i].tobytes()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=store, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and not any(t.is_alive() for t in threads)
    after = _large_copy_state()
    assert after[method]["copies"] - before[method]["copies"] == 40


def test_a_forked_child_splits_its_copies_with_a_helper_of_its_own(namespace, large_copy):
    """The helper thread is its process's: a child forked while it exists (the parent
    split a copy) starts its own at its first split, rather than waiting on one that
    fork did not copy."""
    import multiprocessing

    from capsule_sessions._limits import STREAM_COPY_MIN_BYTES

    large_copy("stream_split")
    frame = np.random.default_rng(7).integers(0, 256, STREAM_COPY_MIN_BYTES + 64, dtype=np.uint8)
    with cs.SessionManager(2, shared=namespace, cleanup_interval=None) as parent:
        assert parent.create("p").store_frame(frame, source="c", max_recent=2)
        results = multiprocessing.get_context("fork").Queue()

        def child():
            from capsule_sessions._shm import _large_copy_state

            alone = _large_copy_state()["split_alone"]["copies"]  # (the parent's count, inherited)
            with cs.SessionManager(2, shared=namespace + "c", cleanup_interval=None) as mgr:
                cam = mgr.create("c")
                for seq in range(3):
                    assert cam.store_frame(frame, source="c", max_recent=2, frame_seq=seq)
                whole = bytes(cam.latest_visual_frames(10)[-1].data) == frame.tobytes()
            results.put((whole, _large_copy_state()["split_alone"]["copies"] - alone))

        proc = multiprocessing.get_context("fork").Process(target=child)
        proc.start()
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
            pytest.fail("the forked child's split copy hung")
        assert proc.exitcode == 0
        whole, alone = results.get(timeout=5)
        assert whole and alone == 0  # its own helper copied the halves


def test_large_stores_use_the_copy_that_measures_cheaper_and_try_the_other(manager, large_copy):
    """The machine decides which copy is faster (_stream_copy.h): each is measured, the
    cheaper one copies most frames, and the other still gets a run now and then."""
    from capsule_sessions._limits import STREAM_COPY_MIN_BYTES
    from capsule_sessions._shm import _large_copy_state

    large_copy(None)
    before = _large_copy_state()
    frame = np.zeros(STREAM_COPY_MIN_BYTES, dtype=np.uint8)
    cam = manager.create("big")
    for _ in range(2100):  # the first runs of each (32 copies), then past a period of 2048
        assert cam.store_frame(frame, source="c", max_recent=2)
    after = _large_copy_state()
    counts = {m: after[m]["copies"] - before[m]["copies"] for m in LARGE_COPIES}
    assert sum(counts.values()) == 2100
    assert all(after[m]["ns_per_mib"] > 0 for m in LARGE_COPIES)
    cheaper = min(LARGE_COPIES, key=lambda m: after[m]["ns_per_mib"])
    assert min(counts.values()) >= 8  # every method had at least one run
    assert counts[cheaper] > 0
