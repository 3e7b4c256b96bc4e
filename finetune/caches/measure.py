"""Time and peak memory of one model call: what `longtune bench kv` and eval's KV suite report.

Peak memory is the growth of the process over what it held just before the call:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the memory
  allocated before;
- CPU (Linux): the peak resident set (`VmHWM` in /proc/self/status), reset before the call by
  writing 5 to /proc/self/clear_refs, minus the resident set before. It counts every page the
  process touched (allocator slack included), so compare methods measured the same way in the
  same process; None where /proc is not available.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_STAT = Path("/proc/stat")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Give freed heap back to the OS (else a later call reuses it unseen), reset VmHWM."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def sync(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: clocks a measurement can use: wall clock (the default, what a user waits), or the process's
#: CPU time (on a shared machine, with one torch thread: the time the work itself took)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_peak(fn, device="cpu", clock: str = "wall"):
    """(fn(), seconds, peak extra bytes or None), seconds on `clock` around the synchronised call."""
    device = torch.device(device)
    now = CLOCKS[clock]
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = now()
        out = fn()
        sync(device)
        seconds = now() - t0
        return out, seconds, int(torch.cuda.max_memory_allocated(device) - base)
    gc.collect()
    base = status_kib("VmRSS") if reset_peak_rss() else None
    t0 = now()
    out = fn()
    seconds = now() - t0
    peak = status_kib("VmHWM") if base is not None else None
    return out, seconds, None if peak is None else max(0, peak - base) * 1024


def _machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat), None where unreadable."""
    try:
        f = [int(x) for x in _STAT.read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = f + [0] * (8 - len(f))
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class OtherLoad:
    """How many CPUs other processes kept busy while the block ran (Linux; None elsewhere):
    the machine's busy time (/proc/stat) minus this process's CPU time, over the wall time.
    With `--clock cpu` on a shared machine a method's CPU time grows when neighbours compete
    for caches and memory bandwidth (or share its core), so this says how busy the box was
    when a row was measured; 0 is a quiet machine.

        with OtherLoad() as load:
            ...
        load.cpus  # float or None
    """

    def __enter__(self):
        self.cpus = None
        self._j0, self._c0, self._w0 = _machine_jiffies(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        j1, c1, w1 = _machine_jiffies(), time.process_time(), time.perf_counter()
        if self._j0 is None or j1 is None or w1 <= self._w0:
            return False
        total = j1[1] - self._j0[1]
        if total <= 0:
            return False
        ncpu = os.cpu_count() or 1
        wall_cpus = (w1 - self._w0) * ncpu  # CPU-seconds the machine had during the block
        busy = (j1[0] - self._j0[0]) / total * wall_cpus  # CPU-seconds the machine spent
        self.cpus = max(0.0, (busy - (c1 - self._c0)) / (w1 - self._w0))
        return False
