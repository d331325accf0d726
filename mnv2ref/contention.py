"""CPU contention: how many CPUs other processes are using, and a busy
process to measure with.

    threads_free(2)        # 2 on an idle machine, 1 while another process spins
    with busy_core():      # one core kept busy, as by `python3 -c "while True: pass"`
        ...

The fast path (`fast.py`) asks `threads_free` before each forward pass:
its kernels fork and join ~40 times per image and every join waits for the
slowest thread, so a thread sharing its core with a busy process makes
two threads slower than one. `bench --contended` measures under `busy_core`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def busy_cpus_elsewhere() -> int:
    """How many CPUs other processes are keeping busy right now: the
    runnable threads of the whole system (/proc/loadavg) less this process's
    own running ones (the thread pool's workers spin for a while after each
    kernel). 0 where /proc is not there."""
    try:
        with open("/proc/loadavg", "rb") as f:
            runnable = int(f.read().split()[3].split(b"/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/self/task/{task}/stat", "rb") as f:
                    stat = f.read()
                own += stat[stat.rindex(b")") + 2:][:1] == b"R"
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, runnable - max(own, 1))


_LOAD_CHECK_INTERVAL_S = 0.05
# Looks in a row that must see other load before threads are given up. One
# look is a snapshot of the run queue, and a snapshot catches short-lived
# work (another process's thread pool winding down, a daemon waking up): in
# `bench`, with every engine's idle worker alive beside it, single looks made
# 2-thread numba give up its second thread on most images (9.9 ms against
# 6.3 ms; AMD EPYC, 2026-12-02). A process that keeps a core busy is seen by
# every look, so it is still caught within about 0.15 s.
BUSY_LOOKS = 3
_load_check = [-1.0, 0, 0]  # (time of the last look, CPUs busy elsewhere then, looks in a row that saw load)


def threads_free(requested: int) -> int:
    """`requested` threads, fewer if other processes keep CPUs busy: at most
    the CPUs left over, at least 1. Looks at the load at most every 50 ms,
    and counts it only once `BUSY_LOOKS` looks in a row have seen it.

    Why: the kernels fork and join ~40 times per image, and a join waits
    for the slowest thread. A thread that shares its core with a busy
    process gets a time slice now and then, so each join waits milliseconds:
    measured on 2 cores with `python3 -c "while True: pass"` running, a
    224x224 image took 46 ms on 2 threads against 12.7 ms on 1."""
    if requested <= 1:
        return requested
    now = time.monotonic()
    if now - _load_check[0] > _LOAD_CHECK_INTERVAL_S:
        busy = busy_cpus_elsewhere()
        _load_check[:] = [now, busy, _load_check[2] + 1 if busy else 0]
    busy = _load_check[1] if _load_check[2] >= BUSY_LOOKS else 0
    return max(1, min(requested, (os.cpu_count() or 1) - busy))


@contextlib.contextmanager
def busy_core(seconds: float = 0.3):
    """Keep one CPU busy with a spinning child process for the body (the
    scheduler places it; it is not pinned). Waits `seconds` first, so the
    load is there when the body starts; the child is killed on exit."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(seconds)
        yield child
    finally:
        child.kill()
        child.wait()
