"""Host load: CPU (system and this process) from psutil, GPU utilisation and memory from
NVML through torch when CUDA is present.

A background thread samples every ``interval`` seconds so that reading the load on the
request path costs nothing.  The planner does not steer on CPU percentages directly
(a busy CPU is *our* work most of the time); it steers on the queue and on the
observed/predicted time ratio of the cost model, which is what co-located load that
steals cycles actually changes.  These readings are for operators (metrics,
/v1/policy) and explain that ratio.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import psutil
import torch

log = logging.getLogger("anytime.load")


@dataclass
class GpuReading:
    device: int
    utilization: float | None  # [0, 1], None when NVML is unavailable
    memory_used_bytes: int
    memory_total_bytes: int


@dataclass
class LoadReading:
    cpu_system: float = 0.0  # [0, 1] over all cores
    cpu_process: float = 0.0  # [0, 1] of the cores this process may use
    cores: int = 1
    gpus: list[GpuReading] = field(default_factory=list)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_gpus() -> list[GpuReading]:
    """NVML readings through torch (needs the nvidia-ml-py package for utilisation);
    empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        try:
            util: float | None = torch.cuda.utilization(i) / 100.0
        except Exception:  # pynvml missing or NVML not initialisable: memory still works
            util = None
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuReading(i, util, total - free, total))
    return out


class LoadMonitor:
    """Samples host load in a daemon thread; ``latest`` is the newest reading."""

    def __init__(self, interval: float = 1.0, on_sample=None) -> None:
        self.interval = interval
        self.on_sample = on_sample  # called with each reading (metrics)
        self.latest = LoadReading(cores=available_cores())
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> LoadReading:
        cores = available_cores()
        reading = LoadReading(
            cpu_system=psutil.cpu_percent(interval=None) / 100.0,
            cpu_process=min(1.0, self._proc.cpu_percent(interval=None) / 100.0 / cores),
            cores=cores,
            gpus=read_gpus(),
        )
        self.latest = reading
        if self.on_sample is not None:
            self.on_sample(reading)
        return reading

    def start(self) -> None:
        psutil.cpu_percent(interval=None)  # the first call only sets the reference point
        self._proc.cpu_percent(interval=None)
        self._thread = threading.Thread(target=self._loop, name="load-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # a failed reading must never take the server down
                log.exception("load sampling failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class LoopLag:
    """How late the event loop runs: a task that asks to wake every ``interval`` seconds
    and records by how much it overslept.

    A request's bytes wait in the socket until the loop gets to them, so under load the
    server first sees a request up to one lag after the client sent it, and its answer
    leaves up to one lag after it is ready.  The request path counts both: arrival is
    taken as ``now - recent()`` and the compute must end one lag before the deadline.
    ``recent()`` is the largest lag of the last ``window`` samples (conservative: a burst
    of lag sheds more, it never makes the server promise more)."""

    def __init__(self, interval: float = 0.005, window: int = 20) -> None:
        self.interval = interval
        self._samples: collections.deque[float] = collections.deque([0.0], maxlen=window)
        self._task = None

    def recent(self) -> float:
        return max(self._samples)

    def forget(self) -> None:
        """Drop the samples so far (a pause the server made itself, not load)."""
        self._samples.clear()
        self._samples.append(0.0)

    async def run(self) -> None:
        import asyncio

        while True:
            t = time.monotonic()
            await asyncio.sleep(self.interval)
            self._samples.append(max(0.0, time.monotonic() - t - self.interval))

    def start(self) -> None:
        import asyncio

        self._task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


class RateMeter:
    """Arrivals per second over a sliding window: the offered load of one model, counted
    before any shedding (a shed request is load the server could not serve)."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            # Over the window, or over the time since the first arrival in it if shorter
            # (a burst after silence is measured at once, not diluted by the silence).
            span = max(now - self._times[0], self.window_s / 4)
            return len(self._times) / min(self.window_s, span)

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window_s:
            self._times.popleft()
