"""``--shared NS`` on demo and ingest, and ``capsule-sessions attach``: another process
reads the demo's sessions from shared memory and reports its own drops and latency."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import uuid

import numpy as np
import pytest

import capsule_sessions as cs
from capsule_sessions import VisualFrame, cli
from capsule_sessions.cli._attacher import frame_problem
from support import finish_command, start_command


def _shm_available() -> bool:
    try:
        import capsule_sessions._shm  # noqa: F401
    except ImportError:
        return False
    return True


DEMO = ["--cameras", "2", "--size", "64x48", "--fps", "40", "--slow-ms", "5", "--display", "none"]


def ours(namespace: str) -> list[str]:
    if not os.path.isdir("/dev/shm"):
        return []
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(f"capsule.{namespace}."))


def new_namespace() -> str:
    return f"t-cli-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def namespace():
    ns = new_namespace()
    yield ns
    gc.collect()
    assert ours(ns) == [], "shared memory left behind"


# -- across processes: one demo, three readers at once ---------------------------------
@pytest.fixture(scope="module")
def demo_and_readers(tmp_path_factory):
    """A 2 s demo with its sessions shared, and at the same time three attach
    processes: a fast one to the end, a slow one (drop_newest, a queue of one, 40 ms
    per frame against 40 fps) that must drop, and one that stops after 0.5 s."""
    if not _shm_available():
        pytest.skip("shared sessions need the compiled _shm module")
    ns = new_namespace()
    tmp = tmp_path_factory.mktemp("attach")
    files = {name: tmp / f"{name}.json" for name in ("demo", "fast", "slow", "short")}
    readers = {
        "fast": start_command("attach", "--namespace", ns, "--wait", "20", "--display", "none",
                              "--json", str(files["fast"])),
        "slow": start_command("attach", "--namespace", ns, "--wait", "20", "--display", "plain",
                              "--policy", "drop_newest", "--buffer", "1", "--slow-ms", "40",
                              "--json", str(files["slow"])),
        "short": start_command("attach", "--namespace", ns, "--wait", "20", "--display", "none", "--seconds", "0.5",
                               "--json", str(files["short"])),
    }
    demo = start_command("demo", "--shared", ns, "--seconds", "2", *DEMO, "--json", str(files["demo"]))
    results = {"demo": finish_command(demo), **{name: finish_command(proc) for name, proc in readers.items()}}
    summaries = {name: json.loads(path.read_text()) if path.exists() else None for name, path in files.items()}
    return {"namespace": ns, "pid": demo.pid, "results": results, "summaries": summaries}


def _by_id(summary):
    return {s["id"]: s for s in summary["sessions"]}


@pytest.mark.cython
def test_every_process_exits_0_and_leaves_no_shared_memory(demo_and_readers):
    for name, (code, out, err) in demo_and_readers["results"].items():
        assert code == 0, f"{name}: exit {code}\n{out}\n{err}"
        assert "Traceback" not in err
    assert ours(demo_and_readers["namespace"]) == []


@pytest.mark.cython
def test_the_demo_says_where_it_shares_and_its_summary_is_the_usual_one(demo_and_readers):
    ns = demo_and_readers["namespace"]
    code, out, err = demo_and_readers["results"]["demo"]
    assert f"capsule-sessions attach --namespace {ns}" in err
    summary = demo_and_readers["summaries"]["demo"]
    assert summary["shared"] == ns and summary["backend"] == "cython"
    assert summary["accounting_problems"] == []
    assert [s["id"] for s in summary["sessions"]] == ["cam0", "cam1"]
    assert "cam0" in out and "Subscribers" in out


@pytest.mark.cython
def test_a_fast_reader_gets_frames_from_every_session_with_the_right_bytes(demo_and_readers):
    summary = demo_and_readers["summaries"]["fast"]
    demo = _by_id(demo_and_readers["summaries"]["demo"])
    assert summary["command"] == "attach" and summary["namespace"] == demo_and_readers["namespace"]
    assert summary["accounting_problems"] == [] and summary["failures"] == []
    assert sorted(_by_id(summary)) == ["cam0", "cam1"]
    for s in summary["sessions"]:
        assert s["status"] == "ended"  # the demo deleted it: SubscriptionClosed
        assert s["owner_pid"] == demo_and_readers["pid"] and summary["pid"] != demo_and_readers["pid"]
        assert s["received"] > 0
        assert s["delivered"] == s["received"] and s["queued"] == 0
        assert s["integrity_errors"] == 0 and s["stamped"] == s["received"]
        assert (s["width"], s["height"], s["mime_type"]) == (64, 48, "video/x-raw-rgb")
        assert s["bytes"] == s["received"] * 64 * 48 * 3
        assert s["latency_ms"]["count"] == s["received"] and s["latency_ms"]["p50"] is not None
        # Both sides see the same session: the reader's visual_stats are the owner's.
        assert s["ring"]["accepted"] == demo[s["id"]]["accepted"]
        assert s["delivered"] + s["dropped"] <= s["ring"]["accepted"]


@pytest.mark.cython
def test_a_slow_reader_sees_its_own_drops(demo_and_readers):
    summary = demo_and_readers["summaries"]["slow"]
    code, out, err = demo_and_readers["results"]["slow"]
    assert summary["accounting_problems"] == [] and summary["failures"] == []
    for s in summary["sessions"]:
        assert (s["policy"], s["buffer"]) == ("drop_newest", 1)
        assert s["received"] > 0 and s["delivered"] == s["received"]
        assert s["dropped"] > 0  # 40 ms of work per frame against a frame every 25 ms
        assert s["delivered"] + s["dropped"] <= s["ring"]["accepted"]
        assert s["integrity_errors"] == 0
    assert "dropped" in out and "bad frames" in out
    assert "received" in err  # --display plain: progress lines on stderr


@pytest.mark.cython
def test_a_reader_with_seconds_stops_early_and_drains(demo_and_readers):
    summary = demo_and_readers["summaries"]["short"]
    assert summary["accounting_problems"] == [] and summary["failures"] == []
    for s in summary["sessions"]:
        assert s["status"] == "stopped"
        assert s["received"] > 0 and s["delivered"] == s["received"] and s["queued"] == 0


# -- in one process: what the reader checks -----------------------------------------------
def _frame(data, *, seq=0, width=4, height=2, mime="video/x-raw-rgb", source="synthetic:4x2@30"):
    return VisualFrame(bytes(data), mime, width, height, source, 0, seq)


def test_frame_problem_checks_the_stamp_the_size_and_the_jpeg_marker():
    good = np.zeros(4 * 2 * 3, np.uint8)
    good[:8] = np.frombuffer((7).to_bytes(8, "little"), np.uint8)
    assert frame_problem(_frame(good, seq=7)) == (True, "")
    stamped, problem = frame_problem(_frame(good, seq=8))
    assert stamped and "first 8 bytes say frame 7" in problem
    assert frame_problem(_frame(good[:-3], seq=7))[1].endswith("not 4x2x3")
    assert frame_problem(_frame(good, seq=8, source="camera")) == (False, "")  # no stamp to check
    assert frame_problem(_frame(b"\xff\xd8\xff\xe0", mime="image/jpeg", source="x")) == (False, "")
    assert "not a JPEG" in frame_problem(_frame(b"GIF8", mime="image/jpeg", source="x"))[1]


@pytest.mark.cython
@pytest.mark.skipif(not _shm_available(), reason="shared sessions need the compiled _shm module")
def test_wrong_bytes_are_an_accounting_error_exit_3(namespace, tmp_path):
    out = tmp_path / "attach.json"
    with cs.SessionManager(2, shared=namespace, backend="cython", cleanup_interval=None) as manager:
        session = manager.create("cam0")
        pixels = np.zeros((2, 4, 3), np.uint8)

        def produce():
            deadline = time.monotonic() + 20
            while session.shared_stats()["subscriptions"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)  # until the reader (this process, on the main thread) subscribed
            for seq in range(20):
                # Every fifth frame carries the stamp of the next one: wrong bytes.
                pixels.reshape(-1)[:8].view("<u8")[0] = seq + (seq % 5 == 4)
                session.store_frame(pixels, source="synthetic:4x2@100", max_recent=2, frame_seq=seq,
                                    width=4, height=2, mime_type="video/x-raw-rgb")
            manager.delete("cam0")

        producer = threading.Thread(target=produce)
        producer.start()
        code = cli.main(["attach", "--namespace", namespace, "--wait", "10", "--buffer", "64", "--display", "none",
                         "--json", str(out)])
        producer.join()
    summary = json.loads(out.read_text())
    (s,) = summary["sessions"]
    assert code == 3
    assert s["integrity_errors"] == 4 and s["received"] == 20
    assert "frame 4: its first 8 bytes say frame 5" in summary["accounting_problems"][0]


@pytest.mark.cython
@pytest.mark.skipif(not _shm_available(), reason="shared sessions need the compiled _shm module")
def test_nothing_to_attach_to_exits_1(namespace, tmp_path, capsys):
    out = tmp_path / "attach.json"
    assert cli.main(["attach", "--namespace", namespace, "--wait", "0.2", "--display", "none",
                     "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["sessions"] == []
    assert summary["failures"] == [f"no shared session appeared in namespace {namespace!r} within 0.2 s"]
    assert "FAILED no shared session appeared" in capsys.readouterr().out


@pytest.mark.cython
@pytest.mark.skipif(not _shm_available(), reason="shared sessions need the compiled _shm module")
def test_ingest_shared_runs_and_cleans_up(namespace, tmp_path):
    out = tmp_path / "ingest.json"
    code = cli.main(["ingest", "synthetic:32x24@40", "--shared", namespace, "--backend", "cython", "--seconds", "0.3",
                     "--realtime", "--display", "none", "--slow-ms", "0", "--json", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["shared"] == namespace and summary["accounting_problems"] == []


# -- usage errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("command_name", ["demo", "ingest"])
def test_shared_with_the_python_backend_is_a_usage_error(command_name, capsys):
    sources = ["synthetic:16x16@10"] if command_name == "ingest" else []
    assert cli.main([command_name, *sources, "--shared", "ns1", "--backend", "python", "--seconds", "0.2"]) == 2
    captured = capsys.readouterr()
    assert "--shared needs the compiled backend (--backend cython)" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""


@pytest.mark.parametrize("argv", [
    ["demo", "--shared", "a/b"],
    ["demo", "--shared", ".."],
    ["ingest", "synthetic:16x16@10", "--shared", "x" * 65],
    ["attach", "--namespace", "a.b"],
    ["attach", "--namespace", ""],
])
def test_a_bad_namespace_is_a_usage_error(argv, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert "namespace must be 1-64 characters of A-Z a-z 0-9 _ -" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


@pytest.mark.parametrize("flags, fragment", [
    ([], "give exactly one of --namespace NS (sessions shared in this machine's memory) or --redis URL"),
    (["--namespace", "n", "--buffer", "65"], "--buffer: must be an integer in 1..64"),
    (["--namespace", "n", "--policy", "drop_all"], "--policy: invalid choice"),
    (["--namespace", "n", "--seconds", "0"], "--seconds: must be a number of seconds > 0"),
    (["--namespace", "n", "--wait", "-1"], "--wait: must be a number of seconds >= 0"),
    (["--namespace", "n", "--slow-ms", "-1"], "--slow-ms: must be a number of ms >= 0"),
])
def test_bad_attach_flags_exit_2(flags, fragment, capsys):
    assert cli.main(["attach", *flags]) == 2
    assert fragment in capsys.readouterr().err


def test_no_shared_memory_module_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(cs.shared, "_shm", None)
    assert cli.main(["attach", "--namespace", "n", "--wait", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capsule-sessions attach: error: ") and "shared-memory module" in err
    if "cython" in cs.available_backends():
        assert cli.main(["demo", "--shared", "n", "--backend", "cython", "--seconds", "0.2"]) == 2
        assert "--shared: shared= needs the compiled backend's shared-memory module" in capsys.readouterr().err


@pytest.mark.cython
@pytest.mark.skipif(not _shm_available(), reason="shared sessions need the compiled _shm module")
def test_a_namespace_another_process_uses_for_the_same_ids_is_a_usage_error(namespace, capsys):
    with cs.SessionManager(2, shared=namespace, backend="cython", cleanup_interval=None) as manager:
        manager.create("cam1")
        assert cli.main(["demo", "--shared", namespace, "--backend", "cython", *DEMO, "--seconds", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "another live process already shares a session 'cam1'" in err
    assert len(err.strip().splitlines()) == 1


def test_attach_help(capsys):
    assert cli.main(["attach", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--namespace" in out and "exit status" in out and "--slow-ms" in out
