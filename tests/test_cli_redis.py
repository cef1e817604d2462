"""``--redis URL`` on demo and ingest, and ``capsule-sessions attach --redis URL``: the
sessions in a real redis-server (tests/redis_server.py), read by a second process as a
remote vision worker that reports its own drops and latency."""

from __future__ import annotations

import json
import sys
import time
import uuid

import pytest
import redis

from capsule_sessions import SessionState, available_backends, cli
from capsule_sessions.redis import RedisSessionManager
from redis_server import RedisServer, free_port
from support import assert_counts_add_up, finish_command, start_command

DEMO = ["--cameras", "2", "--size", "64x48", "--fps", "40", "--slow-ms", "5", "--display", "none"]
FRAME_BYTES = 64 * 48 * 3
# A latency on the wrong clock is either clamped to 0 (time.monotonic minus a Unix
# instant) or decades; one on the server's clock is a few ms, under load a few hundred.
PLAUSIBLE_MS = 5000.0


def new_namespace() -> str:
    return f"t-cli-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def namespace() -> str:
    """A Redis namespace of the test's own, so tests sharing the server never meet."""
    return new_namespace()


@pytest.fixture
def node(redis_url, namespace):
    """The test's own node on the namespace: no eviction, stopped (never closed) at teardown."""
    manager = RedisSessionManager(redis_url, 8, namespace=namespace, cleanup_interval=None)
    yield manager
    manager.stop()


@pytest.fixture
def processes():
    """``start(*args)``: a ``capsule-sessions`` child; any still running at teardown is killed."""
    started = []

    def start(*args: str):
        proc = start_command(*args, backend=available_backends()[0])
        started.append(proc)
        return proc

    yield start
    stop_all(started)


def stop_all(procs) -> None:
    """Kill whichever of ``procs`` still runs, and reap them all."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def wait_for_sessions(manager, proc, count: int, timeout: float = 20.0) -> None:
    """Until ``manager`` lists ``count`` sessions, made by the child ``proc``."""
    deadline = time.monotonic() + timeout
    while len(listed(manager)) < count:
        if proc.poll() is not None:
            code, out, err = finish_command(proc)
            pytest.fail(f"{proc.args} ended (exit {code}) before its sessions were listed\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for the sessions of {proc.args}")
        time.sleep(0.02)


def listed(manager) -> list[str]:
    return [s.id for s in manager.list()]


def by_id(summary) -> dict:
    return {s["id"]: s for s in summary["sessions"]}


def assert_plausible(latency_ms: dict, count: int) -> None:
    assert latency_ms["count"] == count
    assert 0.0 < latency_ms["p50"] <= latency_ms["p99"] <= latency_ms["max"] < PLAUSIBLE_MS, latency_ms


# -- demo and ingest with their sessions in Redis ---------------------------------------
def test_demo_redis_counts_add_up_on_the_servers_clock(redis_url, namespace, node, tmp_path, capsys):
    out = tmp_path / "demo.json"
    code = cli.main(["demo", *DEMO, "--seconds", "0.5", "--redis", redis_url, "--redis-namespace", namespace,
                     "--sampler-interval", "0.1", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(out.read_text())
    assert summary["backend"] == "redis" and summary["shared"] is None
    assert summary["redis"] == {"url": redis_url, "namespace": namespace}
    assert summary["store_error"] == ""
    assert [s["id"] for s in summary["sessions"]] == ["cam0", "cam1"]
    assert_counts_add_up(summary)
    for s in summary["sessions"]:
        assert s["accepted"] > 0 and s["store_failed"] == 0
        assert (s["ring"]["accepted"], s["ring"]["rate_limited"]) == (s["accepted"], s["rate_limited"])
        assert [sub["label"] for sub in s["subscribers"]] == ["fast", "slow", "async"]
        for sub in s["subscribers"]:
            assert sub["error"] == ""
            assert_plausible(sub["latency_ms"], sub["received"])
        (sampler,) = s["samplers"]
        assert sampler["calls"] >= 1 and sampler["violations"] == 0 and sampler["error"] == ""
        assert 0.0 < sampler["newest_age_ms"]["p50"] < PLAUSIBLE_MS
    # The title and the first line say where the sessions are, and how to read them.
    out_text = " ".join(captured.out.split())  # a rich title wraps at the table's width
    assert f"sessions in Redis at {redis_url}, namespace {namespace!r}" in out_text
    assert f"capsule-sessions attach --redis {redis_url} --redis-namespace {namespace}" in captured.err
    assert "latency: the Redis server's clock" in out_text
    assert listed(node) == []  # the demo deleted its sessions


def test_ingest_redis_on_video_time_stamps_on_the_servers_clock(redis_url, namespace, tmp_path):
    # Read flat out, the sessions run on video time: a StreamClock that must start at the
    # server's now, or the ring would record the sessions as idle since long ago.
    out = tmp_path / "ingest.json"
    code = cli.main(["ingest", "synthetic:32x24@40", "--seconds", "1", "--redis", redis_url,
                     "--redis-namespace", namespace, "--sampler-interval", "0.25", "--slow-ms", "0",
                     "--display", "none", "--json", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert_counts_add_up(summary)
    (s,) = summary["sessions"]
    assert s["clock"] == "video" and s["accepted"] == 40
    # Due at 0.25, 0.5 and 0.75 s of video; the last frame is at 0.975 s.
    assert s["samplers"][0]["calls"] == 3 and s["samplers"][0]["violations"] == 0
    client = redis.Redis.from_url(redis_url)
    try:
        server_now = float(client.time()[0])
        # The ended session's hash is kept for a while: its last touch is the last store.
        active = float(client.hget(f"{namespace}:{{s0}}:session", "active"))
    finally:
        client.close()
    assert server_now - 60 < active < server_now + 60


# -- the remote vision worker -------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_server_url(redis_server_process):
    """The run's redis-server for this module's one scenario, which a namespace of its
    own keeps apart (started again if a fault test elsewhere killed it)."""
    if redis_server_process.proc is None or redis_server_process.proc.poll() is not None:
        redis_server_process.restart()
    return redis_server_process.url


@pytest.fixture(scope="module")
def demo_and_workers(shared_server_url, tmp_path_factory):
    """A 3 s demo with its sessions in Redis and, once they are there, three attach
    processes: a fast one to the end, a slow one (drop_newest, a queue of one, 40 ms per
    frame against 40 fps) that must drop, and one that stops after 0.5 s and must leave
    the demo's sessions alone."""
    url, ns = shared_server_url, new_namespace()
    tmp = tmp_path_factory.mktemp("redis-workers")
    files = {name: tmp / f"{name}.json" for name in ("demo", "fast", "slow", "short")}
    node = RedisSessionManager(url, 8, namespace=ns, cleanup_interval=None)
    started = []

    def start(*args: str):
        started.append(start_command(*args, backend=available_backends()[0]))
        return started[-1]

    try:
        demo = start("demo", *DEMO, "--seconds", "3", "--redis", url, "--redis-namespace", ns,
                     "--json", str(files["demo"]))
        wait_for_sessions(node, demo, 2)
        worker = ["attach", "--redis", url, "--redis-namespace", ns, "--display", "none"]
        workers = {
            "fast": start(*worker, "--json", str(files["fast"])),
            "slow": start(*worker, "--policy", "drop_newest", "--buffer", "1", "--slow-ms", "40",
                          "--json", str(files["slow"])),
            "short": start(*worker, "--seconds", "0.5", "--json", str(files["short"])),
        }
        results = {"short": finish_command(workers["short"])}
        # The demo runs on after the short worker let go: its sessions are still live.
        live_after_short = listed(node) if demo.poll() is None else None
        results.update({name: finish_command(proc) for name, proc in workers.items() if name != "short"})
        results["demo"] = finish_command(demo)
    finally:
        node.stop()
        stop_all(started)
    summaries = {name: json.loads(path.read_text()) if path.exists() else None for name, path in files.items()}
    return {"url": url, "namespace": ns, "results": results, "summaries": summaries,
            "live_after_short": live_after_short}


def test_every_process_exits_0_without_a_traceback(demo_and_workers):
    for name, (code, out, err) in demo_and_workers["results"].items():
        assert code == 0, f"{name}: exit {code}\n{out}\n{err}"
        assert "Traceback" not in err


def test_a_fast_worker_gets_every_cameras_frames_with_the_right_bytes(demo_and_workers):
    summary = demo_and_workers["summaries"]["fast"]
    demo = by_id(demo_and_workers["summaries"]["demo"])
    assert summary["command"] == "attach" and summary["redis"] == demo_and_workers["url"]
    assert summary["namespace"] == demo_and_workers["namespace"]
    assert summary["accounting_problems"] == [] and summary["failures"] == []
    assert sorted(by_id(summary)) == ["cam0", "cam1"]
    for s in summary["sessions"]:
        assert s["status"] == "ended"  # the demo deleted it: SubscriptionClosed on this node too
        assert s["owner_pid"] is None and s["shared"] == {}
        assert s["received"] > 0 and s["delivered"] == s["received"] and s["queued"] == 0
        assert s["integrity_errors"] == 0 and s["stamped"] == s["received"]
        assert (s["width"], s["height"], s["mime_type"]) == (64, 48, "video/x-raw-rgb")
        assert s["bytes"] == s["received"] * FRAME_BYTES
        assert_plausible(s["latency_ms"], s["received"])
        # The worker's counts are the cluster's: what the demo accepted, all of it
        # received or dropped but the frames accepted before the worker subscribed.
        assert s["ring"]["accepted"] == demo[s["id"]]["accepted"]
        assert s["delivered"] + s["dropped"] <= s["ring"]["accepted"]


def test_a_slow_worker_sees_its_own_drops(demo_and_workers):
    summary = demo_and_workers["summaries"]["slow"]
    assert summary["accounting_problems"] == [] and summary["failures"] == []
    assert sorted(by_id(summary)) == ["cam0", "cam1"]
    for s in summary["sessions"]:
        assert (s["policy"], s["buffer"]) == ("drop_newest", 1)
        assert s["received"] > 0 and s["delivered"] == s["received"]
        assert s["dropped"] > 0  # 40 ms of work per frame against a frame every 25 ms
        assert s["delivered"] + s["dropped"] <= s["ring"]["accepted"]


def test_a_worker_that_stops_early_leaves_the_demos_sessions_alone(demo_and_workers):
    summary = demo_and_workers["summaries"]["short"]
    assert summary["accounting_problems"] == [] and summary["failures"] == []
    for s in summary["sessions"]:
        assert s["status"] == "stopped" and s["received"] > 0 and s["delivered"] == s["received"]
    if demo_and_workers["live_after_short"] is not None:
        assert demo_and_workers["live_after_short"] == ["cam0", "cam1"]
    # Had a worker ended a session, the demo's own subscribers would have closed early
    # and their books would not balance.
    demo = demo_and_workers["summaries"]["demo"]
    assert_counts_add_up(demo)
    assert all(s["status"] in ("done", "stopped") for s in demo["sessions"])


def test_a_worker_started_first_waits_for_the_demo(redis_url, namespace, processes, tmp_path):
    out = tmp_path / "worker.json"
    worker = processes("attach", "--redis", redis_url, "--redis-namespace", namespace, "--wait", "20",
                       "--display", "none", "--json", str(out))
    time.sleep(1.0)  # the worker is up, and finds nothing yet
    demo = processes("demo", *DEMO, "--seconds", "1.5", "--redis", redis_url, "--redis-namespace", namespace)
    (code, stdout, err), (demo_code, _, demo_err) = finish_command(worker), finish_command(demo)
    assert (code, demo_code) == (0, 0), f"{err}\n{demo_err}"
    summary = json.loads(out.read_text())
    assert summary["waited"] > 0 and summary["failures"] == [] and summary["accounting_problems"] == []
    assert sorted(by_id(summary)) == ["cam0", "cam1"]
    for s in summary["sessions"]:
        assert s["status"] == "ended" and s["received"] > 0 and s["integrity_errors"] == 0
    assert f"Redis at {redis_url}, namespace {namespace}" in " ".join(stdout.split())


def test_a_worker_leaves_a_session_alone_that_never_sends(redis_url, namespace, node, tmp_path):
    session = node.create("quiet")
    watcher = session.subscribe_visual_frames(1)
    out = tmp_path / "worker.json"
    code = cli.main(["attach", "--redis", redis_url, "--redis-namespace", namespace, "--seconds", "0.3",
                     "--display", "none", "--json", str(out)])
    assert code == 1  # attached, but no frame came
    (s,) = json.loads(out.read_text())["sessions"]
    assert (s["id"], s["status"], s["received"]) == ("quiet", "stopped", 0)
    # Stopping the worker's node ended nothing: the session and its other subscriber live on.
    assert listed(node) == ["quiet"] and session.state is not SessionState.CLOSED
    assert not watcher.closed
    watcher.close()


def test_nothing_in_the_namespace_exits_1(redis_url, namespace, tmp_path, capsys):
    out = tmp_path / "worker.json"
    assert cli.main(["attach", "--redis", redis_url, "--redis-namespace", namespace, "--wait", "0.2",
                     "--display", "none", "--json", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["sessions"] == []
    assert summary["failures"] == [f"no session appeared in Redis at {redis_url}, namespace {namespace!r}, "
                                   "within 0.2 s"]
    assert "FAILED no session appeared" in capsys.readouterr().out


# -- failures of the server -----------------------------------------------------------------
def test_the_server_dying_mid_demo_fails_it_cleanly(processes, tmp_path):
    server = RedisServer()
    try:
        out = tmp_path / "demo.json"
        demo = processes("demo", *DEMO, "--seconds", "5", "--redis", server.url, "--json", str(out))
        node = RedisSessionManager(server.url, 8, cleanup_interval=None)
        try:
            wait_for_sessions(node, demo, 2)
        finally:
            node.stop()
        time.sleep(0.3)
        started = time.monotonic()
        server.kill()
        code, stdout, err = finish_command(demo, timeout=30)
    finally:
        server.close()
    assert code == 1, err
    assert time.monotonic() - started < 15  # no wait for an end that cannot come
    assert "Traceback" not in err
    assert f"Redis at {server.url} is unavailable" in err
    summary = json.loads(out.read_text())
    assert summary["store_error"] and summary["accounting_problems"] == []
    assert all(s["status"] == "failed" for s in summary["sessions"])


@pytest.mark.parametrize("command", ["demo", "attach"])
def test_an_unreachable_server_exits_1_naming_the_url(command, capsys):
    url = f"redis://capsule:secret@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    assert cli.main([command, "--redis", url, "--seconds", "0.2", "--display", "none"]) == 1
    assert time.monotonic() - started < 5
    captured = capsys.readouterr()
    masked = url.replace(":secret@", ":***@")
    assert captured.err.startswith(f"capsule-sessions {command}: error: --redis: Redis at {masked} is unavailable")
    assert "secret" not in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and captured.out == ""


# -- usage errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["demo", "--redis", "redis://127.0.0.1:1/0", "--shared", "ns"], "--redis and --shared cannot be used together"),
    (["ingest", "synthetic:16x16@10", "--redis", "redis://127.0.0.1:1/0", "--shared", "ns"],
     "--redis and --shared cannot be used together"),
    (["demo", "--redis", "redis://127.0.0.1:1/0", "--backend", "python"], "--redis and --backend cannot be used"),
    (["demo", "--redis-namespace", "ns"], "--redis-namespace needs --redis URL"),
    (["demo", "--redis", "redis://127.0.0.1:1/0", "--redis-namespace", "a/b"],
     "--redis-namespace: namespace must be 1-64 characters of A-Z a-z 0-9 _ . -, got 'a/b'"),
    (["demo", "--redis", "http://127.0.0.1:1/0"],
     "--redis: url must start with redis://, rediss:// or unix://, got 'http://127.0.0.1:1/0'"),
    (["ingest", "synthetic:16x16@10", "--redis", "redis://127.0.0.1:port/0"],
     "--redis: url 'redis://127.0.0.1:port/0' is not a valid Redis URL"),
    (["attach"], "give exactly one of --namespace NS (sessions shared in this machine's memory) or --redis URL "
                 "(sessions in Redis): neither was given"),
    (["attach", "--namespace", "ns", "--redis", "redis://127.0.0.1:1/0"], "both were given"),
    (["attach", "--namespace", "ns", "--redis-namespace", "ns"], "--redis-namespace needs --redis URL"),
    (["attach", "--redis", "http://x"], "--redis: url must start with redis://"),
    (["attach", "--redis", "redis://127.0.0.1:1/0", "--buffer", "2147483648"],
     "--buffer: must be an integer in 1..2147483647"),
])
def test_usage_errors_exit_2_with_one_line(argv, fragment, capsys):
    assert cli.main([*argv, "--seconds", "0.2", "--display", "none"]) == 2
    captured = capsys.readouterr()
    assert fragment in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_a_worker_takes_a_buffer_past_the_shared_memory_limit(redis_url, namespace, capsys):
    # 64 bounds a queue in shared memory; a Redis subscription's queue is this process's.
    assert cli.main(["attach", "--redis", redis_url, "--redis-namespace", namespace, "--buffer", "4096",
                     "--wait", "0", "--display", "none"]) == 1
    assert "no session appeared" in capsys.readouterr().out


def test_an_id_another_process_holds_is_a_usage_error(redis_url, namespace, node, capsys):
    node.create("cam1")
    assert cli.main(["demo", *DEMO, "--seconds", "0.2", "--redis", redis_url, "--redis-namespace", namespace]) == 2
    err = capsys.readouterr().err
    assert "another process has a live session 'cam1' there; choose another --redis-namespace" in err
    assert len(err.strip().splitlines()) == 1
    assert listed(node) == ["cam1"]  # cam0, made first, was deleted again; cam1 untouched


@pytest.mark.parametrize("argv", [["demo", "--redis", "redis://127.0.0.1:1/0"],
                                  ["attach", "--redis", "redis://127.0.0.1:1/0"]])
def test_without_the_redis_extra_it_is_a_usage_error_naming_it(argv, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis now raises ImportError
    assert cli.main([*argv, "--seconds", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"capsule-sessions {argv[0]}: error: --redis needs redis, which is not installed "
                           "(pip install 'capsule_sessions[redis]')")


@pytest.mark.parametrize("command", ["demo", "ingest", "attach"])
def test_help_documents_redis(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--redis URL" in out and "--redis-namespace NS" in out


def test_a_session_made_again_between_its_listing_and_the_subscribe_is_gone_not_a_crash(redis_url, namespace, node):
    """The worker lists a session, which ends and is made again under its id before the
    worker subscribes: the old object's subscribe raises SessionNotFoundError (its
    incarnation is gone), which the worker reads as "gone", as for an ended session."""
    from capsule_sessions.cli._attach_stores import Gone, RedisSessions

    node.create("cam0")
    store = RedisSessions(redis_url, namespace)
    try:
        [(key, session_id)] = store.listed()
        node.delete("cam0")
        node.create("cam0")
        with pytest.raises(Gone):
            store.subscribe(store.open(key, session_id), 4, "drop_oldest")
        [(fresh, _)] = store.listed()  # the new incarnation is listed as a new session
        assert fresh is not key and not store.subscribe(store.open(fresh, "cam0"), 4, "drop_oldest").closed
    finally:
        store.close()
