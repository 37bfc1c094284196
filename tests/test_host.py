"""What the host's CPUs did over a timed window (mlgcn_dist.bench.host): the kernel's counters read and compared."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from mlgcn_dist.bench import host
from mlgcn_dist.bench.host import HostSample, ThreadCounters
from mlgcn_dist.bench.report import host_lines

# /proc/<tid>/sched of a Linux 6.8 kernel, cut to the lines read and a few around them.
SCHED = """python (4242, #threads: 31)
-------------------------------------------------------------------
se.exec_start                                :      16350048.711771
se.sum_exec_runtime                          :          9123.004512
se.nr_migrations                             :                   17
nr_switches                                  :                  940
nr_voluntary_switches                        :                  900
nr_involuntary_switches                      :                   40
se.load.weight                               :              1048576
"""


def test_the_scheduler_files_are_read_as_the_kernel_writes_them():
    assert host.parse_schedstat("91230045120 3400211 1022\n") == (91230045120, 3400211)
    assert host.parse_schedstat("") is None
    counters = host.parse_sched(SCHED)
    assert (counters["se.nr_migrations"], counters["nr_voluntary_switches"], counters["nr_involuntary_switches"]) \
        == (17, 900, 40)
    assert "se.exec_start" not in counters  # not an integer counter
    # The name (field 2) may hold spaces and parentheses: fields are counted after its last ")".
    fields = " ".join(["S"] + [str(n) for n in range(4, 39)] + ["11"] + ["0"] * 13)
    assert host.parse_stat_core(f"4242 (pt_autograd_0 (x) y) {fields}") == 11
    assert host.parse_stat_core("4242 (python) S 1 2") is None
    assert host.parse_cpu_jiffies("cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 1 2 3 4\n") == (170, 990)
    assert host.parse_cpu_jiffies("intr 1 2 3\n") is None
    assert host.parse_cpuinfo_mhz("processor\t: 0\ncpu MHz\t\t: 3400.125\n\nprocessor\t: 1\ncpu MHz\t\t: 1200.000\n") \
        == {0: 3400.125, 1: 1200.0}


def _counters(run_ms: float, wait_ms: float, sleeps: int, preempted: int, moves: int, core: int = 0) -> ThreadCounters:
    return ThreadCounters(int(run_ms * 1e6), int(wait_ms * 1e6), sleeps, preempted, moves, core)


def test_a_window_gives_each_threads_counters_a_step_and_sums_the_backward_threads_alive_at_both_ends():
    before = HostSample(_counters(100, 10, 5, 1, 0), {7: _counters(50, 0, 2, 0, 0), 8: _counters(0, 0, 0, 0, 0)},
                        process_cpu_s=10.0, cpu_jiffies=(1000, 4000))
    after = HostSample(_counters(300, 30, 25, 5, 10, core=3),
                       {7: _counters(150, 20, 12, 2, 4), 9: _counters(999, 9, 9, 9, 9)},  # 8 ended, 9 began
                       process_cpu_s=13.0, cpu_jiffies=(1600, 5000))
    window = host.host_window(before, after, steps=10, seconds=2.0, mhz={0: 1000.0, 3: 3000.0, 5: 2000.0})
    assert window["loop"] == pytest.approx({"cpu_ms": 20.0, "runqueue_ms": 2.0, "sleeps": 2.0, "preemptions": 0.4,
                                            "migrations": 1.0})
    assert window["backward"] == pytest.approx({"cpu_ms": 10.0, "runqueue_ms": 2.0, "sleeps": 1.0, "preemptions": 0.2,
                                                "migrations": 0.4})  # thread 7 alone
    assert window["process_cores_busy"] == pytest.approx(1.5)
    assert window["host_busy_frac"] == pytest.approx(0.6)
    assert (window["mhz_median"], window["mhz_min"], window["mhz_max"], window["loop_core_mhz"]) == (2000, 1000, 3000,
                                                                                                    3000)


def test_a_counter_the_kernel_does_not_give_is_none_not_zero():
    unknown = ThreadCounters(None, None, None, None, None, None)
    sample = HostSample(unknown, {}, process_cpu_s=1.0, cpu_jiffies=None)
    window = host.host_window(sample, sample, steps=4, seconds=1.0, mhz={})
    assert set(window["loop"].values()) == {None}
    assert window["backward"] is None  # no autograd device thread: the backward ran in the loop
    assert (window["host_busy_frac"], window["mhz_median"], window["loop_core_mhz"]) == (None, None, None)


@pytest.mark.skipif(not Path("/proc/thread-self/schedstat").exists(), reason="Linux's per-thread schedstat")
def test_a_loop_that_sleeps_each_step_reads_as_sleeping_and_one_that_spins_as_running():
    def window(step) -> dict:
        before = host.sample()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        return host.host_window(before, host.sample(), 10, time.perf_counter() - t0)["loop"]

    def spin():
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass

    sleeping, spinning = window(lambda: time.sleep(0.01)), window(spin)
    assert sleeping["sleeps"] >= 1 > spinning["sleeps"]
    assert spinning["cpu_ms"] > 5 > sleeping["cpu_ms"]


def test_the_host_setup_lists_the_governors_and_the_idle_states_a_core_may_enter_in_their_order(tmp_path,
                                                                                                monkeypatch):
    cpus = tmp_path / "cpu"
    for core, governor in enumerate(("performance", "performance", "powersave")):
        (cpus / f"cpu{core}" / "cpufreq").mkdir(parents=True)
        (cpus / f"cpu{core}" / "cpufreq" / "scaling_governor").write_text(governor + "\n")
    for number, name, latency, disabled in ((0, "POLL", 0, 0), (2, "C6", 170, 0), (10, "C10", 890, 0),
                                            (1, "C1", 2, 1)):
        state = cpus / "cpu0" / "cpuidle" / f"state{number}"
        state.mkdir(parents=True)
        for file, value in (("name", name), ("latency", latency), ("disable", disabled)):
            (state / file).write_text(f"{value}\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Example CPU 9000\ncpu MHz\t\t: 2000.0\n")
    monkeypatch.setattr(host, "CPU_SYS", cpus)
    monkeypatch.setattr(host, "PROC", proc)
    assert host.host_setup() == {"cpu_model": "Example CPU 9000", "governors": {"performance": 2, "powersave": 1},
                                 "idle_states": [["POLL", 0], ["C6", 170], ["C10", 890]]}  # C1 is disabled
    (cpus / "cpu1" / "cpufreq" / "scaling_cur_freq").write_text("3100000\n")
    assert host.core_mhz() == {1: 3100.0}  # cpufreq where the kernel has it, else /proc/cpuinfo
    (cpus / "cpu1" / "cpufreq" / "scaling_cur_freq").unlink()
    assert host.core_mhz() == {0: 2000.0}


def test_the_report_prints_a_host_row_per_phase_and_nothing_for_a_report_from_before_it():
    loop = {"cpu_ms": 51.2, "runqueue_ms": 0.31, "sleeps": 4.0, "preemptions": 1.5, "migrations": 2.0}
    window = {"loop": loop, "backward": None, "process_cores_busy": 1.93, "host_busy_frac": 0.12,
              "mhz_median": 1500.0, "mhz_min": 800.0, "mhz_max": 3700.0, "loop_core_mhz": 3650.0}
    report = {"host": {"cpu_model": "Example CPU", "governors": {"schedutil": 16}, "idle_states": [["C6", 170]]},
              "phases": {"ceiling": {"host": window}, "e2e_decode_cpu": {"host": {**window, "backward": loop}}}}
    lines = host_lines(report)
    assert "Example CPU; 16 cores schedutil; idle states C6 (170 us)" in lines[0]
    ceiling, e2e = lines[2].split(), lines[3].split()
    assert ceiling == ["ceiling", "51.2", "0.31", "4.0", "1.5", "2.0", "in", "loop", "1.93", "12.0%", "1500", "3650"]
    assert e2e[6:11] == ["51.2", "0.31", "4.0", "1.5", "2.0"]
    assert host_lines({"phases": {"ceiling": {}}}) == []


@pytest.mark.skipif(not Path("/proc/thread-self/schedstat").exists(), reason="Linux's per-thread schedstat")
def test_the_loop_is_the_thread_that_samples_and_another_threads_work_counts_for_the_process_alone():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(1000))

    before = host.sample()
    t0 = time.perf_counter()
    other = threading.Thread(target=spin)
    other.start()
    time.sleep(0.3)
    stop.set()
    other.join()
    window = host.host_window(before, host.sample(), 1, time.perf_counter() - t0)
    assert window["loop"]["cpu_ms"] < 50  # the sampling thread slept
    assert window["process_cores_busy"] > 0.5  # the spinning one counts for the process


def _named_thread(name: str, ready: threading.Event, stop: threading.Event) -> None:
    """A thread whose kernel-side name (comm) is ``name``, as PyTorch names its autograd threads."""
    import ctypes

    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME
    ready.set()
    stop.wait(30)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="Linux's thread affinity, on at least two cores")
def test_pinning_holds_the_loop_and_each_backward_thread_on_a_core_of_its_own_and_gives_their_masks_back_after():
    ready, stop = threading.Event(), threading.Event()
    backward = threading.Thread(target=_named_thread, args=("pt_autograd_0", ready, stop))
    backward.start()
    try:
        ready.wait(10)
        (tid,) = host.backward_threads()
        loop = threading.get_native_id()
        masks = os.sched_getaffinity(loop), os.sched_getaffinity(tid)
        with host.pinned_threads() as pins:
            assert set(pins) == {loop, tid} and pins[loop] != pins[tid]
            assert os.sched_getaffinity(loop) == {pins[loop]} and os.sched_getaffinity(tid) == {pins[tid]}
        assert (os.sched_getaffinity(loop), os.sched_getaffinity(tid)) == masks
    finally:
        stop.set()
        backward.join()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux's thread affinity")
def test_a_thread_the_kernel_will_not_pin_is_left_as_it_was_and_the_block_still_runs(monkeypatch):
    real = os.sched_setaffinity
    loop = threading.get_native_id()
    mask = os.sched_getaffinity(loop)

    def refuse_a_single_core(tid, cores):
        if len(cores) == 1:
            raise PermissionError(1, "Operation not permitted")
        real(tid, cores)

    monkeypatch.setattr(os, "sched_setaffinity", refuse_a_single_core)
    with host.pinned_threads() as pins:
        assert pins == {}
        assert os.sched_getaffinity(loop) == mask
