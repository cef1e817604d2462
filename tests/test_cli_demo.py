"""``capsule-sessions demo`` end to end, its flags, exit codes and the command dispatcher."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from capsule_sessions import available_backends, cli

TINY = ["--cameras", "2", "--size", "64x48", "--fps", "40", "--seconds", "0.5", "--slow-ms", "5",
        "--display", "none"]


def run_demo(tmp_path, *flags):
    out = tmp_path / "summary.json"
    code = cli.main(["demo", *TINY, *flags, "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else None


def assert_counts_add_up(summary):
    assert summary["accounting_problems"] == []
    for s in summary["sessions"]:
        assert s["offered"] == s["accepted"] + s["rate_limited"] + s["rejected"]
        assert s["ring"]["accepted"] == s["accepted"]
        assert s["ring"]["rate_limited"] == s["rate_limited"]
        for sub in s["subscribers"]:
            assert sub["delivered"] + sub["dropped"] + sub["queued"] == s["accepted"], sub
            assert sub["received"] == sub["delivered"]
            assert sub["integrity_errors"] == 0
            assert sub["error"] == ""
            assert sub["latency_ms"]["count"] == sub["received"]


def assert_paced_count(session, count):
    if session["status"] == "done":
        assert session["offered"] == count
    else:
        assert session["status"] == "stopped" and 0 < session["offered"] < count


def test_demo_counts_add_up_on_every_backend(tmp_path, backend):
    code, summary = run_demo(tmp_path, "--backend", backend)
    assert code == 0
    assert summary["backend"] == backend
    assert [s["id"] for s in summary["sessions"]] == ["cam0", "cam1"]
    for s in summary["sessions"]:
        # 40 fps for 0.5 s, paced: 20 frames, unless a loaded machine made the camera
        # miss the --seconds wall-clock cap ("stopped"); every frame offered is accepted.
        assert_paced_count(s, 20)
        assert s["accepted"] == s["offered"] and s["rate_limited"] == 0
        assert s["ring"]["frames"] == 2  # --max-recent default
        assert s["width"] == 64 and s["height"] == 48
        assert s["bytes"] == s["accepted"] * 64 * 48 * 3
        assert [sub["label"] for sub in s["subscribers"]] == ["fast", "slow", "async"]
    assert_counts_add_up(summary)


def test_demo_rate_limit_and_max_recent(tmp_path, backend):
    # A 10 s interval inside a 0.5 s run: only the first frame gets through.
    code, summary = run_demo(tmp_path, "--backend", backend, "--min-interval", "10", "--max-recent", "5")
    assert code == 0
    for s in summary["sessions"]:
        assert_paced_count(s, 20)
        assert (s["accepted"], s["rate_limited"]) == (1, s["offered"] - 1)
        assert s["ring"]["frames"] == 1
    assert_counts_add_up(summary)


def test_demo_subscribers_flag_with_repeats_and_sampler(tmp_path, backend):
    code, summary = run_demo(tmp_path, "--backend", backend, "--cameras", "1",
                             "--subscribers", "fast,fast,async,sampler", "--sampler-interval", "0.1")
    assert code == 0
    (s,) = summary["sessions"]
    assert [sub["label"] for sub in s["subscribers"]] == ["fast", "fast#2", "async"]
    assert [sm["label"] for sm in s["samplers"]] == ["sampler"]
    assert s["samplers"][0]["violations"] == 0
    assert_counts_add_up(summary)


def test_demo_prints_the_summary_table(tmp_path, capsys):
    code, summary = run_demo(tmp_path)
    assert code == 0
    out = capsys.readouterr().out
    for heading in ("offered", "accepted", "rate-limited", "fps", "MB/s", "backend", "delivered", "dropped",
                    "p50 ms", "p99 ms"):
        assert heading in out
    assert f"backend {summary['backend']}" in out
    assert "cam0" in out and "cam1" in out and "slow" in out
    assert "ACCOUNTING ERROR" not in out


def test_demo_without_rich_prints_plain_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich now raises ImportError
    code, _ = run_demo(tmp_path, "--display", "plain")
    assert code == 0
    out = capsys.readouterr().out
    assert "Subscribers" in out and "rate-limited" in out
    assert "─" not in out  # no rich box drawing


def test_demo_live_display_without_rich_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich", None)
    code, summary = run_demo(tmp_path, "--display", "live")
    assert code == 2 and summary is None
    err = capsys.readouterr().err
    assert "capsule_sessions[cli]" in err and len(err.strip().splitlines()) == 1


def test_demo_report_png(tmp_path):
    pytest.importorskip("matplotlib")
    report = tmp_path / "out" / "report.png"
    code, _ = run_demo(tmp_path, "--report", str(report))
    assert code == 0
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_report_without_matplotlib_fails_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, summary = run_demo(tmp_path, "--report", str(tmp_path / "r.png"))
    assert code == 2 and summary is None
    assert "capsule_sessions[plot]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--cameras", "0"], "--cameras: must be an integer in 1..64"),
        (["--cameras", "two"], "--cameras: must be an integer"),
        (["--fps", "-5"], "--fps: must be a number of frames per second > 0"),
        (["--fps", "nan"], "--fps: must be"),
        (["--fps", "20000"], "--fps must be at most 10000"),
        (["--size", "1280"], "--size: must be WIDTHxHEIGHT"),
        (["--size", "0x10"], "--size: width and height must be in 1..16384"),
        (["--seconds", "0"], "--seconds: must be a number of seconds > 0"),
        (["--min-interval", "-1"], "--min-interval: must be a number of seconds >= 0"),
        (["--max-recent", "0"], "--max-recent: must be an integer"),
        (["--subscribers", "fast,bogus"], "unknown subscriber 'bogus'"),
        (["--backend", "rust"], "--backend: invalid choice"),
        (["--slow-ms", "-1"], "--slow-ms: must be a number of ms >= 0"),
        (["--cameras", "64", "--size", "16384x16384"], "GiB of precomputed frames"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_exit_2_with_a_message(flags, fragment, capsys):
    assert cli.main(["demo", *flags]) == 2
    captured = capsys.readouterr()
    assert fragment in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.skipif("cython" in available_backends(), reason="only meaningful where the extension is missing")
def test_unavailable_backend_is_a_usage_error(capsys):
    assert cli.main(["demo", "--backend", "cython", *TINY]) == 2
    assert "backend 'cython' is not available here" in capsys.readouterr().err


def test_no_command_and_unknown_command_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--cameras" in out and "exit status" in out


def test_a_missing_command_module_breaks_only_that_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(cli.COMMANDS, "bench", ("capsule_sessions.cli._no_such_module", "benchmarks"))
    assert cli.main(["bench"]) == 2
    assert "not part of this build" in capsys.readouterr().err
    code, _ = run_demo(tmp_path)
    assert code == 0


def test_a_missing_extra_inside_a_command_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "cs_fake_command.py").write_text(textwrap.dedent("""
        import rich  # the extra this command needs
        def add_arguments(parser): pass
        def run(args): return 0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("cs_fake_command", "a command that needs rich"))
    assert cli.main(["fake"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("capsule-sessions fake: error: this command needs rich, which is not installed "
                           "(pip install 'capsule_sessions[cli]')")


def test_python_dash_m_runs_the_demo():
    proc = subprocess.run(
        [sys.executable, "-m", "capsule_sessions", "demo", "--cameras", "1", "--size", "16x16", "--fps", "20",
         "--seconds", "0.2", "--display", "none", "--slow-ms", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "cam0" in proc.stdout and "accepted" in proc.stdout


# -- small honesty fixes -------------------------------------------------------------
@pytest.mark.parametrize("cameras, words", [("1", "1 session -"), ("2", "2 sessions -")])
def test_session_count_is_pluralized(cameras, words, capsys):
    assert cli.main(["demo", *TINY, "--cameras", cameras]) == 0
    out = capsys.readouterr().out
    assert words in out
    assert "1 sessions" not in out


@pytest.mark.parametrize("command", [None, *sorted(cli.COMMANDS)])
def test_help_shows_no_rst_markup(command, capsys):
    # The help texts come from docstrings, where ``name`` is markup, not text to show.
    assert cli.main([command, "--help"] if command else ["--help"]) == 0
    out = capsys.readouterr().out
    assert out and "``" not in out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_an_unknown_flag_shows_the_commands_own_usage(command, capsys):
    assert cli.main([command, "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {cli.PROG} {command} ")
    assert f"{cli.PROG} {command}: error: unrecognized arguments: --bogus" in err


def test_demo_sessions_have_a_vision_sampler_by_default(tmp_path):
    # The README promises each source of `make demo` a vision sampler, the demo step too.
    code, summary = run_demo(tmp_path, "--sampler-interval", "0.1")
    assert code == 0
    for s in summary["sessions"]:
        assert [sm["label"] for sm in s["samplers"]] == ["sampler"]
        assert s["samplers"][0]["calls"] >= 1 and s["samplers"][0]["violations"] == 0
