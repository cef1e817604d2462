"""``capsule-sessions bench``: it runs, prints the table, writes the JSON; the workloads
and the naive port do what docs/bench.md says. No speed is asserted anywhere."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from capsule_sessions import Session, available_backends, cli
from capsule_sessions.bench import ipc, naive, plot, report, runner, targets, workloads
from capsule_sessions.cli import bench as bench_cli
from capsule_sessions.cli._errors import UsageError
from capsule_sessions.cli._extras import MissingExtra, available

RATIO_COLUMNS = ["cython/python", "cython/naive", "cython/memcpy"]
# A miniature of --quick, so the runner's every section (alloc, W8, W9) runs in seconds.
TINY = runner.Settings("tiny", repeats=5, min_batch_s=0.0005, alloc_stores=2, w8_seconds=0.03, w8_repeats=1,
                       w9_frames=60, w9_paced_frames=6, w9_interval_s=0.0005, w9_repeats=1)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def table_header(text: str, first_column: str) -> list:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_column:
            return cells
    raise AssertionError(f"no table starting with {first_column!r} in:\n{text}")


def test_quick_run_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "results" / "bench.json"
    chosen = available_backends() + ["naive", "memcpy"]
    code = bench_cli.run(parse("--quick", "--workloads", "W1,W6", "--targets", ",".join(chosen),
                               "--json", str(out)))
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "bench: 100%" in captured.err  # the plain progress (stderr is not a terminal here)
    header = table_header(printed, "workload")
    expected_targets = [t for t in workloads.targets() if t in chosen]
    assert header == ["workload"] + [f"{t} ns/op" for t in expected_targets] + ["Go ns/op (reference)"] + RATIO_COLUMNS
    assert "| W1_store_4k_0sub |" in printed and "| W6_rate_limited_reject |" in printed
    assert "W3_store" not in printed  # the filter held

    results = json.loads(out.read_text())
    assert {"schema", "machine", "settings", "targets", "workloads", "timed", "alloc", "checks"} <= set(results)
    assert results["settings"]["mode"] == "quick"
    assert results["workloads"] == ["W1_store_4k_0sub", "W6_rate_limited_reject"]
    assert set(results["timed"]) == {"W1_store_4k_0sub", "W6_rate_limited_reject"}
    w1 = results["timed"]["W1_store_4k_0sub"]["results"]
    assert set(w1) == set(expected_targets)
    for figures in w1.values():
        assert len(figures["repeats_ns"]) == 5
        assert figures["ns_per_op"] > 0 and figures["ops_per_batch"] >= 1
    # A rejected store copies nothing: no memcpy figure.
    assert "memcpy" not in results["timed"]["W6_rate_limited_reject"]["results"]
    ratios = results["timed"]["W1_store_4k_0sub"]["ratios"]
    if "cython" in available_backends():
        assert set(ratios) == {"cython/python", "cython/naive", "cython/memcpy"}
        assert all(r > 0 for r in ratios.values())
    else:
        assert ratios == {}
    for check in results["checks"]:
        assert {"backend", "workload", "target", "figure", "met"} <= set(check)
        assert check["backend"] in available_backends()


def test_every_section_of_the_runner_on_every_target(tmp_path):
    """Alloc, W8 and W9 too (with TINY settings): the JSON has every figure and the
    markdown has every section; W9's accounting finds nothing lost."""
    selection = runner.select("W3,W8,W9", None)
    steps = []
    results = runner.run(selection, TINY, steps.append)
    assert len(steps) == runner.total_steps(selection, TINY)
    json.dumps(results, allow_nan=False)  # JSON-ready as it stands (no NaN with samples)

    assert set(results["alloc"]) == {"W3_store_6m_0sub"}
    for figures in results["alloc"]["W3_store_6m_0sub"].values():
        assert figures["peak_alloc_bytes_per_store"] >= 0 and figures["minflt_per_store"] >= 0
    assert set(results["threads"]) == set(workloads.targets()) | {"memcpy_2buf"}
    for figures in results["threads"].values():
        assert figures["fps_1"] > 0 and figures["fps_2"] > 0 and figures["ratio"] > 0
    assert set(results["fanout"]) == set(workloads.backends()) | {"naive"}
    for by_subs in results["fanout"].values():
        assert set(by_subs) == {"1", "4", "16"}
        for subs, phases in by_subs.items():
            for phase in ("free", "paced"):
                r = phases[phase]
                assert r["received"] + r["dropped"] == r["frames"] * int(subs)
                faults = (r["lost"], r["corrupt"], r["counter_mismatch"], r["out_of_order"], r["hung_readers"])
                assert faults == (0,) * 5
    text = report.markdown(results)
    for title in ("### W1-W7", "### Allocation and page faults", "### W8", "### W9", "### Targets"):
        assert title in text
    assert table_header(text, "target")[:4] == ["target", "1 thread frames/s", "2 threads frames/s", "2/1 ratio"]


@pytest.mark.skipif(not available("matplotlib"), reason="matplotlib (the 'plot' extra) is not installed")
def test_plot_writes_a_png(tmp_path):
    results = runner.run(runner.select("W1,W5,W8", None), TINY)
    path = tmp_path / "chart.png"
    plot.write(results, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(bench_cli, "available", lambda module: module != "matplotlib")
    with pytest.raises(MissingExtra, match=r"matplotlib.*capsule_sessions\[plot\]"):
        bench_cli.run(parse("--quick", "--workloads", "W1", "--plot", "x.png", "--no-progress"))


@pytest.mark.parametrize("flags, message", [
    (("--workloads", "W99"), "unknown workload 'W99'"),
    (("--targets", "fortran"), "unknown or unavailable target 'fortran'"),
])
def test_bad_filters_are_usage_errors(flags, message):
    with pytest.raises(UsageError, match=message):
        bench_cli.run(parse("--quick", "--no-progress", *flags))


def test_the_command_is_wired(capsys):
    assert cli.main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    for wid in runner.ALL_IDS:
        assert wid in listed
    assert cli.main(["bench", "--workloads", "nope", "--no-progress"]) == 2


# -- the workloads measure what docs/bench.md describes ---------------------------

def stats_after(workload_id: str, target: str, calls: int):
    case = workloads.BY_ID[workload_id].setup(target)
    try:
        case.run(calls)
        session, subs = case.keep
        return session.visual_stats(), [(s.dropped, s.qsize()) for s in subs]
    finally:
        case.close()


@pytest.mark.parametrize("target", available_backends())
def test_store_workloads_drive_the_ring_as_described(target):
    calls = 100
    stats, subs = stats_after("W1_store_4k_0sub", target, calls)
    assert (stats["accepted"], stats["frames"], stats["bytes"]) == (calls, 2, 2 * 4096)
    stats, subs = stats_after("W2_store_64k_4sub", target, calls)
    assert stats["accepted"] == calls
    assert subs == [(calls - 8, 8)] * 4  # never drained: full after 8, then every offer dropped
    stats, subs = stats_after("W4_store_6m_4sub", target, 10)
    assert stats["bytes"] == 2 * workloads.FRAME_1080P_RGB and subs == [(8, 2)] * 4
    stats, _ = stats_after("W6_rate_limited_reject", target, 330)
    # 1 ms steps against a 33 ms interval: one accepted call in 33 (float steps may make it 34).
    assert 9 <= stats["accepted"] <= 10 and stats["rate_limited"] == 330 - stats["accepted"]
    stats, _ = stats_after("W7_source_switch", target, calls)
    assert stats["source_resets"] == calls - 1 and stats["frames"] == 1


@pytest.mark.parametrize("target", available_backends())
def test_the_loan_workload_commits_every_loan_it_takes(target):
    stats, subs = stats_after("W13_loan_commit_6m", target, 10)
    assert stats == {"accepted": 10, "rate_limited": 0, "source_resets": 0, "frames": 2,
                     "bytes": 2 * workloads.FRAME_1080P_RGB} and subs == []
    case = workloads.BY_ID["W13_loan_commit_6m"].setup(target)
    assert case.op() is True
    (frame,) = case.keep[0].latest_visual_frames(0.0005)  # the last commit's frame, its 8-byte tag written
    assert bytes(frame.data[:8]) == bytes(range(8)) and frame.nbytes == workloads.FRAME_1080P_RGB


def test_the_loan_workload_has_a_memcpy_figure_and_no_naive_one():
    workload = workloads.BY_ID["W13_loan_commit_6m"]
    assert workload.setup("naive") is None and not workload.applies_to("naive")
    case = workload.setup("memcpy")
    case.op()
    (dst, src), = case.keep
    assert dst.nbytes == workloads.FRAME_1080P_RGB and (dst == src).all()


def test_the_loan_workload_is_judged_against_one_memcpy():
    def judged(loan_ns):
        entry = {"repeats_ns": [loan_ns] * 3, "ns_per_op": loan_ns}
        memcpy = {"repeats_ns": [100_000.0] * 3, "ns_per_op": 100_000.0}
        results = {"timed": {"W13_loan_commit_6m": {"aux": False, "results": {"cython": entry, "memcpy": memcpy}}}}
        (check,) = [c for c in targets.evaluate(results, "cython") if c["workload"] == "W13_loan_commit_6m"]
        return check["met"], check["figure"]

    assert judged(2_000.0) == (True, "0.02x memcpy")
    assert judged(2_100.0) == (False, "0.021x memcpy")


@pytest.mark.parametrize("target", available_backends() + ["naive"])
def test_latest_workload_reads_eight_frames(target):
    case = workloads.BY_ID["W5_latest_8x64k"].setup(target)
    frames = case.op()
    assert len(frames) == 8 and all(len(bytes(f.data)) == 65536 for f in frames)


def test_memcpy_copies_the_same_bytes():
    case = workloads.BY_ID["W3_store_6m_0sub"].setup("memcpy")
    case.op()
    (dst, src), = case.keep
    assert dst.nbytes == workloads.FRAME_1080P_RGB and (dst == src).all()
    assert workloads.BY_ID["W6_rate_limited_reject"].setup("memcpy") is None


def test_naive_port_keeps_the_go_semantics_of_the_reference():
    """Same script on the naive port and the python backend, same answers: the naive
    reference is a faithful port, so the comparison measures speed, not shortcuts."""
    script = [  # (data, source, max_recent, min_interval, now)
        (b"a", "camera", 2, 0.0, 1.0), (b"b", "camera", 2, 0.0, 1.001), (b"c", "camera", 2, 0.0, 1.002),
        (b"d", "camera", 2, 0.5, 1.2), (b"e", "camera", 2, 0.5, 1.6), (b"f", "screen", 0, 0.0, 1.7),
        (b"g", "screen", 3, 0.0, 1.8), (b"h", "screen", 3, 0.0, 15.0),
    ]
    ref = Session("ref", clock=lambda: 0.0, backend="python")
    port = naive.NaiveSession(clock=lambda: 0.0)
    ref_sub, port_sub = ref.subscribe_visual_frames(2), port.subscribe_visual_frames(2)
    for data, source, keep, interval, now in script:
        expected = ref.store_frame(data, source=source, max_recent=keep, min_interval=interval, now=now)
        assert port.store_frame(data, source=source, max_recent=keep, min_interval=interval, now=now) == expected
        for ttl, at in ((10.0, now), (0.1, now + 0.05), (0.0, now)):
            assert [bytes(f.data) for f in port.latest_visual_frames(ttl, now=at)] == \
                   [bytes(f.data) for f in ref.latest_visual_frames(ttl, now=at)]
    assert (port_sub.dropped, port_sub.qsize()) == (ref_sub.dropped, ref_sub.qsize())
    ported = [bytes(port_sub.get(timeout=0).data) for _ in range(2)]
    assert ported == [bytes(ref_sub.get(timeout=0).data) for _ in range(2)]
    port_sub.close()
    with pytest.raises(naive.NaiveClosed):
        port_sub.get(timeout=0)


def test_json_never_holds_nan():
    assert bench_cli._finite({"a": [math.nan, 1.0], "b": {"c": math.nan}}) == {"a": [None, 1.0], "b": {"c": None}}


# -- across processes (W10-W12) ---------------------------------------------------------

PEERS = [name for name in ipc.TARGETS if name != ipc.LIBRARY]


def test_quick_across_processes_on_the_peers(tmp_path, capsys):
    """W10 and W11 with --quick on every peer: each case ran in spawned processes that
    all came back by themselves, every figure is there, no frame was torn (but the
    Frigate pattern's: its producer overwrites slots that nothing protects, which is what
    the column is there to show), and nothing of the run is left in /dev/shm."""
    before = ipc.dev_shm()
    out = tmp_path / "ipc.json"
    code = bench_cli.run(parse("--quick", "--workloads", "W10,W11", "--targets", ",".join(PEERS),
                               "--json", str(out), "--no-progress"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "### W10" in printed and "### W11" in printed and "### W1-W7" not in printed
    header = table_header(printed, "target")
    assert header[:4] == ["target", "readers", "producer frames/s", "frames/s per reader"]
    assert header[-3:] == ["producer CPU us/frame", "reader CPU us/frame", "note"]

    results = json.loads(out.read_text())
    assert results["workloads"] == [ipc.W10_ID, ipc.W11_ID] and results["ipc_targets"] == PEERS
    assert results["timed"] == {} and results["checks"] == []  # no library target was selected
    across = results["ipc"]
    for wid in (ipc.W10_ID, ipc.W11_ID):
        assert list(across[wid]["results"]) == PEERS
        for target, by_readers in across[wid]["results"].items():
            if "unavailable" in by_readers:  # faster_fifo or iceoryx2 not installed (the bench extra)
                assert target in across["unavailable"] and "capsule_sessions[bench]" in by_readers["unavailable"]
                continue
            assert set(by_readers) == {"1", "4"}
            assert any(r["received"] > 0 and r["producer_fps"] > 0 for r in by_readers.values()), (wid, target)
            for readers, r in by_readers.items():
                where = f"{wid} {target} {readers}"
                assert (r["runs"], r["failed"], r["errors"], r["forced_exits"]) == (1, 0, [], 0), where
                # A reader starved of the CPU for the whole 1 s window of a quick run on a
                # loaded 2-core machine receives nothing (seen with iceoryx2 and
                # faster_fifo at 4 readers): the books must balance all the same, and
                # every peer must publish and deliver in at least one of its two cases
                # (above; an mp_queue producer with 4 readers was once measured at 0).
                assert r["published"] * int(readers) == r["received"] + r["dropped"], where
                assert r["out_of_order"] == 0, where
                if r["received"]:
                    assert r["p99_us"] >= r["p50_us"] > 0, where
                if wid == ipc.W10_ID and r["published"] > 1:
                    # The processes' CPU per frame: a producer that published in its window
                    # spent CPU on it; a reader's mark needs frames on both sides of it.
                    assert r["producer_cpu_us"] > 0, where
                    assert r["reader_cpu_us"] is None or r["reader_cpu_us"] > 0, where
                if target != "frigate":
                    assert r["torn"] == 0, where
                assert r["shm_left"] == [], where
    assert across["dev_shm"]["left_by_this_run"] == []
    assert [name for name in ipc.dev_shm() - before if ipc.is_ours(name)] == []


def test_the_torn_check_reads_three_stamps():
    size = 4096
    offsets = ipc.stamp_offsets(size)
    frame = ipc.stamped(size, seq=7, t_ns=123)
    assert not ipc.is_torn(frame, offsets) and not ipc.is_torn(frame, offsets, expected_seq=7)
    assert ipc.is_torn(frame, offsets, expected_seq=8)  # the transport named another frame
    for offset in offsets:
        torn = frame.copy()
        ipc.STAMP.pack_into(torn.data, offset, 8, 123)  # one part already overwritten by the next frame
        assert ipc.is_torn(torn, offsets)
    with pytest.raises(ValueError):
        ipc.stamp_offsets(40)


def test_the_library_target_is_unavailable_until_attach_exists():
    import capsule_sessions

    if hasattr(capsule_sessions, "attach"):
        pytest.skip("the shared-memory API is built: the shm target runs")
    reason = ipc.availability([ipc.LIBRARY])[ipc.LIBRARY]
    assert reason == "unavailable (not built)"
    selection = runner.select("W12", "shm")
    assert selection.ipc_targets == ("shm",) and selection.targets == ()
    results = runner.run(selection, TINY)
    assert results["ipc"][ipc.W12_ID]["results"] == {"shm": {"unavailable": reason}}
    reference = results["ipc"][ipc.W12_ID]["in_process"]["results"]
    assert set(reference) == {"4096", "65536", str(workloads.FRAME_1080P_RGB)}
    assert [(c["workload"], c["figure"], c["met"]) for c in results["checks"]] == [(ipc.W12_ID, reason, None)]
    assert "unavailable (not built)" in report.markdown(results)


def _stream(fps: float, p50: float = 100.0, p99: float = 300.0, torn: int = 0) -> dict:
    return {"repeats_fps_per_reader": [fps], "repeats_p50_us": [p50], "repeats_p99_us": [p99],
            "torn": torn, "received": 1000, "errors": []}


def test_the_across_process_targets_are_judged_against_the_same_run():
    """The verdicts of W10-W12 from made-up figures (the shm target does not run yet)."""
    def w10(shm_1: float, shm_4: float, torn: int = 0) -> dict:
        return {"results": {"shm": {"1": _stream(shm_1, torn=torn), "4": _stream(shm_4)},
                            "iceoryx2": {"1": _stream(1700), "4": _stream(1600)},
                            "frigate": {"1": _stream(1800), "4": _stream(1100)},
                            "mp_queue": {"1": _stream(90), "4": _stream(23)}}}

    def verdicts(ipc_results: dict) -> dict:
        return {c["target"]: c["met"] for c in targets.evaluate_ipc({"ipc": ipc_results})}

    good = verdicts({ipc.W10_ID: w10(2000, 1950)})
    assert list(good.values()) == [True] * 5, good
    bad = verdicts({ipc.W10_ID: w10(1750, 1000, torn=1)})
    assert list(bad.values()) == [False, False, False, True, False], bad  # below frigate at 1 reader, ...

    w11 = {"results": {"shm": {"1": _stream(0, 30, 200), "4": _stream(0, 120, 300)},
                       "iceoryx2": {"1": _stream(0, 35, 227), "4": _stream(0, 109, 388)}}}
    assert list(verdicts({ipc.W11_ID: w11}).values()) == [True, False]  # 4 readers: p50 above iceoryx2's

    w12 = {"in_process": {"results": {"65536": {"ns_per_frame": 20.0}}},
           "results": {"shm": {"results": {"4096": {"ns_per_frame": 35.0}, "6220800": {"ns_per_frame": 45.0}}}}}
    assert list(verdicts({ipc.W12_ID: w12}).values()) == [True, False]
