"""iceoryx2 publish-subscribe as a W10/W11 peer (its Python bindings, 0.10).

The payload is ``iceoryx2.Slice[ctypes.c_uint8]``: the producer loans a sample of the
frame's size from its shared-memory data segment, copies the frame into it (one copy),
sends it and notifies an event service of the same name; each reader waits on a listener
of that event service and receives the sample in place (a numpy view of the loaned
shared memory, released with ``delete()`` once checked). A subscriber's buffer holds
``buffer`` samples with safe overflow, so the oldest is replaced: ``drop_oldest``, with
no counter (drops are seen as gaps in the sequence numbers).

Every run gets a config of its own (a unique file prefix and a private root directory),
so that what iceoryx2 leaves behind by design, a small global management file in
/dev/shm, can be removed by ``cleanup`` without touching another user's iceoryx2.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from .._json import JsonObject
from .ipc_peers import Frame, Peer, Producer, Reader, Wiring

OPEN_TIMEOUT_S = 10.0


def _iox2() -> Any:
    import iceoryx2

    iceoryx2.set_log_level(iceoryx2.LogLevel.Error)
    return iceoryx2


def _node(iox2: Any, wiring: Wiring) -> Any:
    config = iox2.config.default()
    config.global_cfg.prefix = iox2.FileName.new(wiring["prefix"])
    config.global_cfg.root_path = iox2.Path.new(wiring["root"] + "/")
    # Disabled: the benchmark ends a child with SIGTERM/SIGKILL when it overstays, and
    # iceoryx2's own handler would otherwise turn SIGTERM into a request it never reads.
    return (iox2.NodeBuilder.new().config(config).signal_handling_mode(iox2.SignalHandlingMode.Disabled)
            .create(iox2.ServiceType.Ipc))


def _pubsub(iox2: Any, node: Any, wiring: Wiring) -> Any:
    return (node.service_builder(iox2.ServiceName.new(wiring["service"]))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .max_publishers(1).max_subscribers(wiring["readers"])
            .subscriber_max_buffer_size(wiring["buffer"]).subscriber_max_borrowed_samples(1)
            .history_size(0).enable_safe_overflow(True))


def _event(iox2: Any, node: Any, wiring: Wiring) -> Any:
    return (node.service_builder(iox2.ServiceName.new(wiring["service"])).event()
            .max_notifiers(1).max_listeners(wiring["readers"]))


class _Producer:
    def __init__(self, wiring: Wiring) -> None:
        iox2 = self.iox2 = _iox2()
        self.node = _node(iox2, wiring)
        self.service = _pubsub(iox2, self.node, wiring).create()
        self.events = _event(iox2, self.node, wiring).create()
        self.size = wiring["size"]
        self.publisher = (self.service.publisher_builder().initial_max_slice_len(self.size)
                          .max_loaned_samples(1).create())
        self.notifier = self.events.notifier_builder().create()

    def publish(self, frame: Frame, seq: int) -> None:
        sample = self.publisher.loan_slice_uninit(self.size)
        ctypes.memmove(sample.payload_ptr, frame.ctypes.data, self.size)  # the one copy
        sample.assume_init().send()
        self.notifier.notify()

    def counters(self) -> JsonObject:
        return {}

    def close(self) -> None:
        for port in ("notifier", "publisher"):
            obj = getattr(self, port, None)
            if obj is not None:
                obj.delete()
                setattr(self, port, None)
        self.service = self.events = self.node = None


class _Reader:
    def __init__(self, wiring: Wiring) -> None:
        iox2 = self.iox2 = _iox2()
        self.node = _node(iox2, wiring)
        # The producer creates the services; a reader opens them once they exist.
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while True:
            try:
                self.service = _pubsub(iox2, self.node, wiring).open()
                self.events = _event(iox2, self.node, wiring).open()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.subscriber = self.service.subscriber_builder().buffer_size(wiring["buffer"]).create()
        self.listener = self.events.listener_builder().create()
        self.sample: Any = None
        self._waits: dict[float, Any] = {}

    def receive(self, timeout: float) -> tuple[Frame, int] | None:
        sample = self.subscriber.receive()
        if sample is None:
            wait = self._waits.get(timeout)
            if wait is None:
                wait = self._waits[timeout] = self.iox2.Duration.from_secs_f64(timeout)
            self.listener.timed_wait(wait)  # every notification since the last wait, or the timeout
            sample = self.subscriber.receive()
            if sample is None:
                return None
        self.sample = sample
        view = sample.payload().as_memory_view()  # the sample's shared memory, in place
        return np.frombuffer(view, dtype=np.uint8), -1

    def release(self) -> None:
        if self.sample is not None:
            self.sample.delete()
            self.sample = None

    def counters(self) -> JsonObject | None:
        return None

    def close(self) -> None:
        self.release()
        for port in ("listener", "subscriber"):
            obj = getattr(self, port, None)
            if obj is not None:
                obj.delete()
                setattr(self, port, None)
        self.service = self.events = self.node = None


class Iceoryx2Peer(Peer):
    name = "iceoryx2"
    description = ("iceoryx2 0.10 publish-subscribe, Slice[c_uint8]: loan + one copy + send, an event "
                   "notification per frame; subscriber buffer with safe overflow (drop oldest)")
    modules = ("iceoryx2",)

    def prepare(self, ctx: Any, size: int, readers: int, buffer: int, tag: str) -> Wiring:
        wiring = super().prepare(ctx, size, readers, buffer, tag)
        wiring["prefix"] = f"{tag}_iox2_"
        wiring["root"] = tempfile.mkdtemp(prefix=f"{tag}_iox2_")
        wiring["service"] = f"capsule-bench/{tag}"
        return wiring

    def producer(self, wiring: Wiring) -> Producer:
        return _Producer(wiring)

    def reader(self, wiring: Wiring, index: int) -> Reader:
        return _Reader(wiring)

    def cleanup(self, wiring: Wiring) -> list[str]:
        shutil.rmtree(wiring["root"], ignore_errors=True)
        swept = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir("/dev/shm")):
                if name.startswith(wiring["prefix"]):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join("/dev/shm", name))
                        swept.append(name)
        return swept
