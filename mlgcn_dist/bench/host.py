"""What the host's CPUs did over a phase's timed window, read from Linux's /proc and /sys at the window's two ends
(nothing a step): how the threads that launch the step's kernels spent it, how busy the host was, its cores' clocks.

Why: in run I (H200, README Performance) the same compiled step's kernels were launched 25-30 us apart at every
ceiling and 14-16 us apart beside the augment process, the device's work unchanged, and the ceiling measured
again came 15% slower than the first: the host's pace, not the settings, moved the ratios. Whether the launching
threads were then waiting for a core, sleeping, moving between cores, or running on slower clocks is what these
figures say, per phase, in the run that measures it.

Per step, for the loop thread (the one that runs :func:`~mlgcn_dist.bench.window.time_training`) and for the
autograd engine's device threads (``pt_autograd_<device>``: CUDA's backward runs there, the CPU's in the loop):

- ``cpu_ms``: time on a core (``/proc/<tid>/schedstat``);
- ``runqueue_ms``: time runnable but waiting for a core (schedstat): other work on its cores;
- ``sleeps``: voluntary switches (a lock, a queue, the GIL, a condition), ``preemptions``: involuntary ones;
- ``migrations``: moves to another core (``se.nr_migrations`` in ``/proc/<tid>/sched``);

and for the window: the process's cores busy (its CPU time over the wall time, every thread), the host's share of
busy cores (``/proc/stat``: loader workers and the augment process included), and the clock of each core at the
window's end (cpufreq's ``scaling_cur_freq``, else ``/proc/cpuinfo``; a VM's may be fixed), the loop's core's apart.
A figure the kernel does not give (another OS, a sandbox that fakes /proc) is None.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CPU_SYS = Path("/sys/devices/system/cpu")
BACKWARD_THREAD_PREFIX = "pt_autograd_"  # the names PyTorch's autograd engine gives its device threads


@dataclass(frozen=True)
class ThreadCounters:
    """A thread's scheduler counters, since it started (None: not exposed)."""

    run_ns: int | None
    runqueue_ns: int | None
    voluntary: int | None
    involuntary: int | None
    migrations: int | None
    core: int | None  # the core it last ran on


@dataclass(frozen=True)
class HostSample:
    """Everything :func:`host_window` compares, at one moment."""

    loop: ThreadCounters
    backward: dict[int, ThreadCounters]  # tid -> counters of each autograd device thread
    process_cpu_s: float
    cpu_jiffies: tuple[int, int] | None  # (busy, total) over every core since boot


def parse_schedstat(text: str) -> tuple[int, int] | None:
    """``/proc/<tid>/schedstat``: (ns on a core, ns waiting on a run queue); None if malformed."""
    fields = text.split()
    if len(fields) < 2 or not all(f.isdigit() for f in fields[:2]):
        return None
    return int(fields[0]), int(fields[1])


def parse_sched(text: str) -> dict[str, int]:
    """``/proc/<tid>/sched``'s integer counters by name (``se.nr_migrations``, ``nr_voluntary_switches``, ...)."""
    counters = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        value = value.strip()
        if sep and value.isdigit():
            counters[name.strip()] = int(value)
    return counters


def parse_stat_core(text: str) -> int | None:
    """The core a thread last ran on, field 39 of ``/proc/<tid>/stat``; the name (field 2) may hold spaces and
    parentheses, so the fields are counted after its last ")"."""
    fields = text.rpartition(")")[2].split()
    core = 39 - 3  # fields after the name start at field 3
    return int(fields[core]) if len(fields) > core and fields[core].lstrip("-").isdigit() else None


def parse_cpu_jiffies(text: str) -> tuple[int, int] | None:
    """``/proc/stat``'s first line (every core): (busy, total) clock ticks; idle and iowait are not busy, and
    guest time is already in user time."""
    first = text.split("\n", 1)[0].split()
    if len(first) < 5 or first[0] != "cpu" or not all(f.isdigit() for f in first[1:]):
        return None
    ticks = [int(f) for f in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = sum(ticks[3:5])
    return sum(ticks) - idle, sum(ticks)


def parse_cpuinfo_mhz(text: str) -> dict[int, float]:
    """``/proc/cpuinfo``: each core's "cpu MHz" by its "processor" number."""
    mhz, core = {}, None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if name == "processor" and value.isdigit():
            core = int(value)
        elif name == "cpu MHz" and core is not None:
            try:
                mhz[core] = float(value)
            except ValueError:
                pass
    return mhz


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # no such file here (another OS), or a thread that has ended
        return None


def thread_counters(tid: int) -> ThreadCounters:
    """The counters of thread ``tid`` of this process."""
    task = PROC / "self" / "task" / str(tid)
    schedstat = parse_schedstat(_read(task / "schedstat") or "")
    sched = parse_sched(_read(task / "sched") or "")
    stat = _read(task / "stat")
    return ThreadCounters(
        run_ns=None if schedstat is None else schedstat[0],
        runqueue_ns=None if schedstat is None else schedstat[1],
        voluntary=sched.get("nr_voluntary_switches"),
        involuntary=sched.get("nr_involuntary_switches"),
        migrations=sched.get("se.nr_migrations"),
        core=None if stat is None else parse_stat_core(stat),
    )


def backward_threads() -> list[int]:
    """The tids of this process's autograd device threads (none before a CUDA backward, none on CPU)."""
    tids = []
    for task in (PROC / "self" / "task").glob("*"):
        if (_read(task / "comm") or "").startswith(BACKWARD_THREAD_PREFIX) and task.name.isdigit():
            tids.append(int(task.name))
    return sorted(tids)


def _process_cpu_s() -> float:
    times = os.times()  # every thread of this process, not its children
    return times.user + times.system


def sample() -> HostSample:
    """The counters now; call it on the thread that runs the loop."""
    stat = _read(PROC / "stat")
    return HostSample(
        loop=thread_counters(threading.get_native_id()),
        backward={tid: thread_counters(tid) for tid in backward_threads()},
        process_cpu_s=_process_cpu_s(),
        cpu_jiffies=None if stat is None else parse_cpu_jiffies(stat),
    )


def core_mhz() -> dict[int, float]:
    """Each core's clock now: cpufreq's current frequency where the kernel has cpufreq, else /proc/cpuinfo's."""
    mhz = {}
    for cur in CPU_SYS.glob("cpu[0-9]*/cpufreq/scaling_cur_freq"):
        khz = (_read(cur) or "").strip()
        if khz.isdigit():
            mhz[int(cur.parent.parent.name.removeprefix("cpu"))] = int(khz) / 1000
    return mhz or parse_cpuinfo_mhz(_read(PROC / "cpuinfo") or "")


def _delta(before: int | None, after: int | None, steps: int, scale: float = 1.0) -> float | None:
    return None if before is None or after is None else (after - before) * scale / steps


def thread_window(before: ThreadCounters, after: ThreadCounters, steps: int) -> dict:
    """Per step between two samples of one thread: ms on a core and waiting for one, sleeps, preemptions,
    migrations."""
    return {
        "cpu_ms": _delta(before.run_ns, after.run_ns, steps, 1e-6),
        "runqueue_ms": _delta(before.runqueue_ns, after.runqueue_ns, steps, 1e-6),
        "sleeps": _delta(before.voluntary, after.voluntary, steps),
        "preemptions": _delta(before.involuntary, after.involuntary, steps),
        "migrations": _delta(before.migrations, after.migrations, steps),
    }


def host_window(before: HostSample, after: HostSample, steps: int, seconds: float,
                mhz: dict[int, float] | None = None) -> dict:
    """The window between two samples, ``steps`` steps in ``seconds`` (module docstring); ``mhz`` the cores'
    clocks at its end (:func:`core_mhz`)."""
    both = sorted(set(before.backward) & set(after.backward))  # a thread present at both ends
    backward = None
    if both:
        per_thread = [thread_window(before.backward[t], after.backward[t], steps) for t in both]
        backward = {key: None if any(w[key] is None for w in per_thread) else sum(w[key] for w in per_thread)
                    for key in per_thread[0]}
    busy = None
    if before.cpu_jiffies and after.cpu_jiffies and after.cpu_jiffies[1] > before.cpu_jiffies[1]:
        busy = (after.cpu_jiffies[0] - before.cpu_jiffies[0]) / (after.cpu_jiffies[1] - before.cpu_jiffies[1])
    process = (after.process_cpu_s - before.process_cpu_s) / seconds if seconds > 0 else None
    mhz = mhz or {}
    loop_core = after.loop.core
    return {
        "loop": thread_window(before.loop, after.loop, steps),
        "backward": backward,
        "process_cores_busy": process,
        "host_busy_frac": busy,
        "mhz_median": statistics.median(mhz.values()) if mhz else None,
        "mhz_min": min(mhz.values()) if mhz else None,
        "mhz_max": max(mhz.values()) if mhz else None,
        "loop_core_mhz": mhz.get(loop_core) if loop_core is not None else None,
    }


def host_setup() -> dict:
    """What the host's power management is set to, read once: the cpufreq governors in use (core counts by name)
    and the idle states the first core may enter (name, exit latency in us; none where cpuidle is not exposed)."""
    governors: dict[str, int] = {}
    for path in CPU_SYS.glob("cpu[0-9]*/cpufreq/scaling_governor"):
        name = (_read(path) or "").strip()
        if name:
            governors[name] = governors.get(name, 0) + 1
    idle_states = []
    for state in sorted(CPU_SYS.glob("cpu0/cpuidle/state[0-9]*"), key=lambda p: int(p.name.removeprefix("state"))):
        if (_read(state / "disable") or "0").strip() == "1":
            continue
        latency = (_read(state / "latency") or "").strip()
        idle_states.append([(_read(state / "name") or "?").strip(), int(latency) if latency.isdigit() else None])
    model = None
    for line in (_read(PROC / "cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {"cpu_model": model, "governors": governors, "idle_states": idle_states}


@contextlib.contextmanager
def pinned_threads() -> Iterator[dict[int, int] | None]:
    """For the block, the calling thread and the autograd device threads each held on one core of those the calling
    thread may use (the one it last ran on where free), their own affinities restored after it. Yields tid -> core
    of the threads it pinned (a thread the kernel refused, or that ended, is left as it was: a diagnostic must not
    fail the phase it serves), or None where threads cannot be pinned (not Linux).

    The experiment it is for (``mlgcn bench train --pinned-ceiling``): if a launching thread loses its pace by moving
    between cores (a core that was idle wakes slowly and runs at a low clock for a while), it keeps it on one."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    tids = [threading.get_native_id(), *backward_threads()]
    allowed = sorted(os.sched_getaffinity(0))
    before: dict[int, set[int]] = {}
    pins: dict[int, int] = {}
    for tid in tids:
        free = [core for core in allowed if core not in pins.values()] or allowed
        last = thread_counters(tid).core
        pins[tid] = last if last in free else free[0]
    try:
        for tid, core in list(pins.items()):
            try:
                mask = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {core})
            except OSError:  # EPERM, EINVAL (a core outside a cpuset), ESRCH (the thread ended)
                del pins[tid]
                continue
            before[tid] = mask
        yield pins
    finally:
        for tid, mask in before.items():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(tid, mask)
