"""The whole matrix: settings, selection, and the JSON-ready results.

``run(selection, settings, progress)`` times W1..W7 and W13 (and the aux points) for every
selected target with interleaved repeats, measures allocation and page faults for the
1080p stores, runs W8 and W9 in this process, W10-W12 in spawned ones (``ipc.py``) and
W14-W16 (``redis_frames.py``) and W17 (``redis_ops.py``) against private redis-servers, and
judges every library backend against the targets (docs/bench.md).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

import capsule_sessions

from .._json import JsonObject
from . import harness, ipc, memory, redis_frames, redis_ops, targets, threaded
from .workloads import BY_ID, TIMED, Case, backends
from .workloads import targets as all_targets

ALLOC_WORKLOADS = ("W3_store_6m_0sub", "W4_store_6m_4sub")
THREADED_IDS = (threaded.W8_ID, threaded.W9_ID)
ALL_IDS = tuple(w.id for w in TIMED) + THREADED_IDS + ipc.IDS + redis_frames.IDS + redis_ops.IDS


@dataclass(frozen=True)
class Settings:
    mode: str
    repeats: int
    min_batch_s: float
    alloc_stores: int
    w8_seconds: float
    w8_repeats: int
    w9_frames: int  # free-running phase
    w9_paced_frames: int  # paced phase
    w9_interval_s: float
    w9_repeats: int
    # W10/W11 (across processes): the measured window of each case after its warm-up,
    # the rounds, and W11's frames at 1 kHz. W12 uses repeats and min_batch_s.
    ipc_seconds: float = 0.3
    ipc_warmup_s: float = 0.1
    ipc_repeats: int = 1
    w11_frames: int = 200
    # W16 (Redis, two processes): frames at 1 kHz per case after a warm-up, and rounds.
    redis_frames: int = 200
    redis_warmup: int = 50
    redis_rounds: int = 1


QUICK = Settings("quick", repeats=5, min_batch_s=0.01, alloc_stores=6, w8_seconds=0.2, w8_repeats=5,
                 w9_frames=1500, w9_paced_frames=150, w9_interval_s=0.001, w9_repeats=1,
                 ipc_seconds=0.3, ipc_warmup_s=0.1, ipc_repeats=1, w11_frames=200,
                 redis_frames=200, redis_warmup=50, redis_rounds=1)
FULL = Settings("full", repeats=9, min_batch_s=0.05, alloc_stores=24, w8_seconds=0.3, w8_repeats=15,
                w9_frames=10000, w9_paced_frames=1500, w9_interval_s=0.001, w9_repeats=3,
                ipc_seconds=1.0, ipc_warmup_s=0.2, ipc_repeats=3, w11_frames=1000,
                redis_frames=1000, redis_warmup=200, redis_rounds=3)


@dataclass(frozen=True)
class Selection:
    workloads: tuple[str, ...]
    targets: tuple[str, ...]
    # The contenders of W10-W12 (ipc.TARGETS): selected by --targets like the others.
    ipc_targets: tuple[str, ...] = ipc.TARGETS


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def select(workloads: str | None = None, target_names: str | None = None) -> Selection:
    """Resolve comma-separated filters: a workload is named by its id or its prefix
    (``W2`` selects W2 and its aux points). Unknown names raise ValueError."""
    ids = list(ALL_IDS)
    if workloads:
        chosen: list[str] = []
        for name in _split(workloads):
            hits = [wid for wid in ALL_IDS if wid.lower() == name.lower() or wid.lower().startswith(name.lower() + "_")]
            if not hits:
                raise ValueError(f"unknown workload {name!r}; choose from {', '.join(ALL_IDS)} (or a prefix like W3)")
            chosen.extend(hit for hit in hits if hit not in chosen)
        ids = [wid for wid in ALL_IDS if wid in chosen]
    names = all_targets()
    ipc_names = list(ipc.TARGETS)
    if target_names:
        chosen = []
        for name in _split(target_names):
            if name not in names and name not in ipc_names:
                known = ", ".join(names + ipc_names)
                extra = " (the Cython extension is not built)" if name == "cython" else ""
                raise ValueError(f"unknown or unavailable target {name!r}{extra}; available: {known}")
            if name not in chosen:
                chosen.append(name)
        names = [name for name in all_targets() if name in chosen]
        # A target that cannot run here (shm before it is built, a peer whose package is
        # missing) may still be named: the report says why it has no figures.
        ipc_names = [name for name in ipc.TARGETS if name in chosen]
    return Selection(tuple(ids), tuple(names), tuple(ipc_names))


def _ipc_ids(selection: Selection) -> list[str]:
    return [wid for wid in selection.workloads if wid in ipc.IDS]


def _redis_ids(selection: Selection) -> list[str]:
    return [wid for wid in selection.workloads if wid in redis_frames.IDS]


def _timed_ids(selection: Selection) -> list[str]:
    return [wid for wid in selection.workloads if wid in BY_ID]


def _w8_targets(selection: Selection) -> list[str]:
    extra = [threaded.W8_MEMCPY_RING] if "memcpy" in selection.targets else []
    return list(selection.targets) + extra


def _w9_targets(selection: Selection) -> list[str]:
    return [t for t in selection.targets if t not in threaded.W9_TARGETS_EXCLUDED]


def total_steps(selection: Selection, settings: Settings) -> int:
    """How many times ``run`` calls ``progress``."""
    n_cases = sum(1 for wid in _timed_ids(selection) for t in selection.targets if BY_ID[wid].applies_to(t))
    steps = harness.steps(n_cases, settings.repeats)
    steps += sum(1 for wid in ALLOC_WORKLOADS if wid in selection.workloads) * len(selection.targets)
    if threaded.W8_ID in selection.workloads:
        steps += settings.w8_repeats * len(_w8_targets(selection)) * 2
    if threaded.W9_ID in selection.workloads:
        steps += settings.w9_repeats * len(_w9_targets(selection)) * len(threaded.W9_SUBSCRIBERS) * 2
    steps += ipc.steps(_ipc_ids(selection), list(selection.ipc_targets), settings.ipc_repeats)
    steps += redis_ops.steps(redis_ops.W17_ID in selection.workloads, settings.repeats)
    if _redis_ids(selection) and redis_frames.unavailable() is None:
        steps += redis_frames.steps(_redis_ids(selection), settings.repeats, settings.redis_rounds)
    return steps


def machine() -> JsonObject:
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": model or "unknown",
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "capsule_sessions": capsule_sessions.__version__,
        "backends": backends(),
        "switch_interval_s": sys.getswitchinterval(),
        "load_average_at_start": load,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _run_timed(selection: Selection, settings: Settings, tick: Callable[[str], None]) -> JsonObject:
    cases: dict[tuple[str, str], Case] = {}
    for wid in _timed_ids(selection):
        for target in selection.targets:
            case = BY_ID[wid].setup(target)
            if case is not None:
                cases[(wid, target)] = case
    try:
        measured = harness.interleaved(cases, settings.repeats, settings.min_batch_s,
                                       progress=lambda key: tick(f"{key[0]} {key[1]}"))
        alloc: dict[str, dict[str, dict[str, float]]] = {}
        for wid in ALLOC_WORKLOADS:
            for target in selection.targets:
                if (wid, target) in cases:
                    alloc.setdefault(wid, {})[target] = memory.measure(cases[(wid, target)], settings.alloc_stores)
                    tick(f"{wid} {target} alloc")
    finally:
        for case in cases.values():
            case.close()
    timed: dict[str, JsonObject] = {}
    for wid in _timed_ids(selection):
        workload = BY_ID[wid]
        results = {target: measured[(wid, target)] for target in selection.targets if (wid, target) in measured}
        timed[wid] = {
            "description": workload.description,
            "aux": workload.aux,
            "params": dict(workload.params),
            "results": results,
            "ratios": _ratios(results),
            "reference_ns": {
                "go": targets.GO_NS.get(targets.short(wid)) if not workload.aux else None,
                "naive": targets.REFERENCE_NAIVE_NS.get(targets.short(wid)) if not workload.aux else None,
                "memcpy": targets.REFERENCE_MEMCPY_NS.get(targets.short(wid)) if not workload.aux else None,
            },
        }
    return {"timed": timed, "alloc": alloc}


def _ratios(results: dict[str, JsonObject]) -> dict[str, float | None]:
    out = {}
    if "cython" in results:
        for other in ("python", "naive", "memcpy"):
            if other in results:
                out[f"cython/{other}"] = harness.paired_ratio(results["cython"], results[other])
    return out


def _run_w8(selection: Selection, settings: Settings, tick: Callable[[str], None]) -> dict[str, JsonObject]:
    names = _w8_targets(selection)
    samples: dict[str, dict[int, list[float]]] = {target: {1: [], 2: []} for target in names}
    cores: dict[str, list[float]] = {target: [] for target in names}
    others: dict[str, list[float]] = {target: [] for target in names}
    for round_no in range(settings.w8_repeats):
        order = list(names)
        random.Random(round_no).shuffle(order)
        for target in order:
            for n in (1, 2):
                result = threaded.run_threads(target, n, seconds=settings.w8_seconds)
                samples[target][n].append(result["fps"])
                if n == 2:
                    cores[target].append(result["cores_used"])
                if result["other_cores_busy"] is not None:
                    others[target].append(result["other_cores_busy"])
                tick(f"{threaded.W8_ID} {target} {n} thread{'s' if n > 1 else ''}")
    # Ratios are taken per repeat (1 then 2 threads back to back), so drift between
    # repeats cancels; the memcpy ratio of the same repeat is the machine's own ceiling
    # at that moment (on a VM, memory bandwidth left by the neighbours varies by 2x).
    ratios = {t: [two / one if one > 0 else math.nan for one, two in zip(by_n[1], by_n[2], strict=True)]
              for t, by_n in samples.items()}
    out = {}
    for target, by_n in samples.items():
        finite = [r for r in ratios[target] if r == r]
        entry: JsonObject = {"fps_1": _median(by_n[1]), "fps_2": _median(by_n[2]),
                 "ratio": _median(finite) if finite else None,
                 "cores_used_2": _median(cores[target]),
                 "other_cores_busy": _median(others[target]) if others[target] else None,
                 "ratio_of_memcpy_ratio": None,
                 "repeats_fps_1": by_n[1], "repeats_fps_2": by_n[2], "seconds": settings.w8_seconds}
        if "memcpy" in ratios:
            relative = [r / m for r, m in zip(ratios[target], ratios["memcpy"], strict=True)
                        if r == r and m == m and m > 0]
            entry["ratio_of_memcpy_ratio"] = _median(relative) if relative else None
        out[target] = entry
    return out


_W9_MEDIANS = ("stored_fps", "delivered_fps", "delivered_fps_per_subscriber", "p50_us", "p99_us", "p99_over_p50")
_W9_SUMS = ("received", "dropped", "lost", "counter_mismatch", "out_of_order", "corrupt", "hung_readers")


def _merge_w9(runs: list[JsonObject]) -> JsonObject:
    merged = {key: _median([r[key] for r in runs]) for key in _W9_MEDIANS}
    merged.update({key: sum(r[key] for r in runs) for key in _W9_SUMS})
    merged.update({key: runs[0][key] for key in ("frames", "interval_s", "buffer", "frame_bytes")})
    merged["runs"] = len(runs)
    return merged


def _run_w9(selection: Selection, settings: Settings,
            tick: Callable[[str], None]) -> dict[str, dict[str, dict[str, JsonObject]]]:
    runs: dict[str, dict[str, dict[str, list[JsonObject]]]] = {}
    for _ in range(settings.w9_repeats):
        for target in _w9_targets(selection):
            for subs in threaded.W9_SUBSCRIBERS:
                slot = runs.setdefault(target, {}).setdefault(str(subs), {"free": [], "paced": []})
                result = threaded.run_fanout(target, subs, settings.w9_frames)
                result.pop("per_subscriber")
                slot["free"].append(result)
                tick(f"{threaded.W9_ID} {target} {subs} sub free-running")
                result = threaded.run_fanout(target, subs, settings.w9_paced_frames, interval=settings.w9_interval_s)
                result.pop("per_subscriber")
                slot["paced"].append(result)
                tick(f"{threaded.W9_ID} {target} {subs} sub paced")
    return {target: {subs: {phase: _merge_w9(results) for phase, results in by_phase.items()}
                     for subs, by_phase in by_subs.items()}
            for target, by_subs in runs.items()}


def run(selection: Selection, settings: Settings, progress: Callable[[str], None] | None = None) -> JsonObject:
    tick = progress or (lambda label: None)
    results: JsonObject = {
        "schema": 1,
        "machine": machine(),
        "settings": asdict(settings),
        "targets": list(selection.targets),
        "ipc_targets": list(selection.ipc_targets),
        "workloads": list(selection.workloads),
    }
    results.update(_run_timed(selection, settings, tick))
    if threaded.W8_ID in selection.workloads:
        results["threads"] = _run_w8(selection, settings, tick)
    if threaded.W9_ID in selection.workloads:
        results["fanout"] = _run_w9(selection, settings, tick)
    if _ipc_ids(selection):
        results["ipc"] = ipc.run(_ipc_ids(selection), list(selection.ipc_targets), window_s=settings.ipc_seconds,
                                 warmup_s=settings.ipc_warmup_s, repeats=settings.ipc_repeats,
                                 w11_frames=settings.w11_frames, latest_repeats=settings.repeats,
                                 min_batch_s=settings.min_batch_s, progress=tick)
    if _redis_ids(selection):
        results.setdefault("redis", {}).update(redis_frames.run(
            _redis_ids(selection), repeats=settings.repeats, min_batch_s=settings.min_batch_s,
            w16_rounds=settings.redis_rounds, w16_frames=settings.redis_frames, w16_warmup=settings.redis_warmup,
            progress=tick))
    if redis_ops.W17_ID in selection.workloads:
        # Against its own bare redis-py figures, whatever --targets says (docs/bench.md).
        results.setdefault("redis", {})[redis_ops.W17_ID] = redis_ops.run(settings.repeats, settings.min_batch_s,
                                                                          tick)
    results["checks"] = [check for backend in selection.targets if backend in backends()
                         for check in targets.evaluate(results, backend)]
    results["checks"] += targets.evaluate_ipc(results)
    results["checks"] += redis_frames.evaluate(results)
    results["checks"] += targets.evaluate_redis(results)
    return results
