"""A run's results as one JSON-ready dict: what the tables, the report and --json show."""

from __future__ import annotations

import os

from .._json import JsonObject
from ._attacher import AttachResult, SessionReader
from ._latency import LatencyHistogram
from ._runner import RunResult, SessionRun


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 4)


def latency_ms(hist: LatencyHistogram) -> dict[str, float | None]:
    return {
        "count": hist.count,
        "p50": _ms(hist.percentile(50)),
        "p99": _ms(hist.percentile(99)),
        "max": _ms(hist.max) if hist.count else None,
    }


def _error(exc: BaseException | None) -> str:
    return "" if exc is None else f"{type(exc).__name__}: {exc}"


def session_summary(run: SessionRun) -> JsonObject:
    producer, source = run.producer, run.source
    seconds = producer.active_seconds
    subscribers = []
    for consumer in run.consumers:
        spec = consumer.spec
        subscribers.append({
            "label": spec.label, "kind": spec.kind, "policy": spec.policy, "buffer": spec.buffer,
            **consumer.counters(),
            "received": consumer.received,
            "untimed": consumer.untimed,
            "integrity_errors": consumer.integrity_errors,
            "latency_ms": latency_ms(consumer.latency),
            "error": _error(consumer.error),
        })
    samplers = []
    for sampler in run.samplers:
        samplers.append({
            "label": sampler.label, "kind": "sampler", "ttl": sampler.ttl, "interval": sampler.interval,
            "calls": sampler.calls, "frames": sampler.frames, "empty_calls": sampler.empty_calls,
            "violations": sampler.violations, "newest_age_ms": latency_ms(sampler.latency),
            "error": _error(sampler.error),
        })
    return {
        "id": run.id,
        "source": source.label,
        "kind": source.kind,
        "description": source.describe() if source.width else "",
        "status": producer.status,
        "clock": "wall" if producer.stream_clock is None else "video",
        "message": producer.message,
        "warning": producer.first_reject,
        "width": source.width,
        "height": source.height,
        "nominal_fps": source.fps,
        "offered": producer.offered,
        "accepted": producer.accepted,
        "rate_limited": producer.rate_limited,
        "rejected": producer.rejected,
        "store_failed": producer.store_failed,
        "bytes": producer.bytes,
        "ring": run.stats,
        "active_seconds": round(seconds, 4),
        "fps": round(producer.accepted / seconds, 2) if seconds > 0 else 0.0,
        "mb_per_s": round(producer.bytes / seconds / 1e6, 2) if seconds > 0 else 0.0,
        "subscribers": subscribers,
        "samplers": samplers,
        "timeline": [[round(t, 3), n] for t, n in run.timeline],
    }


def accounting_problems(summary: JsonObject) -> list[str]:
    """Every way the counts fail to add up (an empty list when they all do)."""
    problems = []
    for s in summary["sessions"]:
        ring = s["ring"]
        if s["offered"] != s["accepted"] + s["rate_limited"] + s["rejected"] + s["store_failed"]:
            problems.append(f"{s['id']}: offered {s['offered']} != accepted + rate-limited + rejected"
                            + (" + failed by the store" if s["store_failed"] else ""))
        # No stats when the session store failed at the end: that failure is reported.
        if ring and (ring["accepted"], ring["rate_limited"]) != (s["accepted"], s["rate_limited"]):
            problems.append(f"{s['id']}: the session's visual_stats() disagree with the producer's counts")
        for sub in s["subscribers"]:
            total = sub["delivered"] + sub["dropped"] + sub["queued"]
            if total != s["accepted"]:
                problems.append(f"{s['id']} {sub['label']}: delivered + dropped + queued = {total}, "
                                f"accepted = {s['accepted']}")
            if sub["received"] != sub["delivered"]:
                problems.append(f"{s['id']} {sub['label']}: received {sub['received']} != delivered {sub['delivered']}")
            if sub["integrity_errors"]:
                problems.append(f"{s['id']} {sub['label']}: {sub['integrity_errors']} frames with wrong bytes")
        for sampler in s["samplers"]:
            if sampler["violations"]:
                problems.append(f"{s['id']} {sampler['label']}: {sampler['violations']} calls broke the ttl/order rule")
    return problems


def summarize(result: RunResult, *, command: str = "") -> JsonObject:
    options = result.options
    out: JsonObject = {
        "command": command,
        "backend": result.backend,
        "seconds": round(result.seconds, 3),
        "interrupted": result.interrupted,
        "uses_config": options.config is not None,
        "jpeg": options.jpeg_quality is not None,
        "shared": options.shared,
        "redis": None if options.redis is None else {"url": result.store_url, "namespace": options.redis_namespace},
        "store_error": result.store_error,
        "sessions": [session_summary(run) for run in result.sessions],
    }
    out["accounting_problems"] = accounting_problems(out)
    return out


# -- attach ---------------------------------------------------------------------------
def reader_summary(reader: SessionReader) -> JsonObject:
    seconds = reader.active_seconds
    sub = reader.subscription
    return {
        "id": reader.id,
        "owner_pid": reader.owner_pid,
        "source": reader.source,
        "mime_type": reader.mime_type,
        "width": reader.width,
        "height": reader.height,
        "status": reader.status,
        "message": reader.message,
        "policy": sub.policy,
        "buffer": sub.maxsize,
        "received": reader.received,
        **reader.counters(),
        "bytes": reader.bytes,
        "active_seconds": round(seconds, 4),
        "fps": round(reader.rate(reader.received), 2),
        "mb_per_s": round(reader.rate(reader.bytes) / 1e6, 2),
        "latency_ms": latency_ms(reader.latency),
        "stamped": reader.stamped,
        "integrity_errors": reader.integrity_errors,
        "first_integrity_error": reader.first_integrity_error,
        "ring": reader.ring,
        "shared": reader.shared,
        "timeline": [[round(t, 3), n] for t, n in reader.timeline],
    }


def attach_problems(summary: JsonObject) -> tuple[list[str], list[str]]:
    """(accounting problems: counts that do not add up or wrong bytes, a bug worth
    reporting; failures: nothing found, a session that could not be read or gave no
    frame). Both empty when everything went well."""
    accounting: list[str] = []
    failures: list[str] = []
    if not summary["sessions"] and not summary["failed"]:
        if summary["redis"] is None:
            failures.append(f"no shared session appeared in namespace {summary['namespace']!r} "
                            f"within {summary['wait']:g} s")
        else:
            failures.append(f"no session appeared in Redis at {summary['redis']}, namespace "
                            f"{summary['namespace']!r}, within {summary['wait']:g} s")
        if summary["list_error"]:
            failures.append(summary["list_error"])
    for session_id, why in summary["failed"].items():
        failures.append(f"{session_id}: {why}")
    for s in summary["sessions"]:
        if s["received"] != s["delivered"]:
            accounting.append(f"{s['id']}: received {s['received']} != delivered {s['delivered']}")
        if s["integrity_errors"]:
            accounting.append(f"{s['id']}: {s['integrity_errors']} frames with wrong bytes, the first: "
                              f"{s['first_integrity_error']}")
        accepted = s["ring"].get("accepted")
        if accepted is not None and s["delivered"] + s["dropped"] + s["queued"] > accepted:
            accounting.append(f"{s['id']}: delivered + dropped + queued = "
                              f"{s['delivered'] + s['dropped'] + s['queued']} > the {accepted} frames the "
                              "session accepted")
        if s["status"] == "failed":
            failures.append(f"{s['id']}: {s['message']}")
        elif not s["received"]:
            failures.append(f"{s['id']}: no frame received ({s['status']} after {s['active_seconds']:.1f} s)")
    return accounting, failures


def summarize_attach(result: AttachResult) -> JsonObject:
    options = result.options
    out: JsonObject = {
        "command": "attach",
        "namespace": result.namespace,
        "redis": options.redis if options else None,
        "list_error": result.list_error,
        "pid": os.getpid(),
        "seconds": round(result.seconds, 3),
        "waited": round(result.waited, 3),
        "wait": options.wait if options else 0.0,
        "interrupted": result.interrupted,
        "sessions": [reader_summary(reader) for reader in result.readers],
        "missed": list(result.missed),
        "failed": dict(result.failed),
    }
    out["accounting_problems"], out["failures"] = attach_problems(out)
    return out
