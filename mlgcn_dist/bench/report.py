"""``mlgcn bench train``'s report as text: the phases as a table, then what explains them."""

from __future__ import annotations

from pathlib import Path

from mlgcn_dist.threads import threads_phrase

# Beyond this ratio between the two measurements of the ceiling, one run's ratios say more of the machine than of
# the settings (between-run noise on the H100 was about 30%, within a run a few percent).
_TRUSTED_DRIFT = 1.25


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _name_width(names: object) -> int:
    """The phase-name column: 30 wide, or one more than the longest name (``ceiling_before_<phase>`` is longer)."""
    return max(30, *(len(name) + 1 for name in names))


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_report(report: dict) -> str:
    """The phases as a table, then compile time, FLOPs and the loader's own rate."""
    setting = report["phases"]["ceiling"]["setting"]
    layout = "channels_last" if setting["channels_last"] else "NCHW"
    mode = "eager"
    if setting["compile"]:
        mode = "compile" if setting["compile_mode"] == "default" else f"compile ({setting['compile_mode']})"
    width = _name_width(report["phases"])
    lines = [
        f"bench train on {report['device']}: {report['model']['backbone']}+{report['model']['head']} "
        f"@{report['image_size']}, batch {report['batch_size']}, {setting['precision']}, "
        f"{layout}, {mode}{_threads(report)}; "
        f"{report['steps']} timed steps after {report['warmup']} warmup (end to end: whole rounds of "
        f"{report['workers']} loader workers)",
        f"{'phase':{width}s}{'img/s':>9s}{'step ms':>9s}{'wait':>7s}{'stall':>7s}{'peak mem':>12s}{'MFU':>7s}"
        f"{'/ceiling':>10s}{'/reference':>11s}  decode",
    ]
    for name, p in report["phases"].items():
        vs = [report["ratios"].get(f"{name}/{base}") for base in ("ceiling", "reference")]
        lines.append(
            f"{name:{width}s}{p['img_s']:9.1f}{p['step_ms']:9.1f}{_percent(p['data_wait_frac']):>7s}"
            f"{_percent(p['data_stall_frac']):>7s}"
            f"{_gib(p['peak_mem_bytes']):>12s}{_percent(p['mfu']):>7s}"
            + "".join(f"{'' if v is None else f'{v:.2f}x':>{w}s}" for v, w in zip(vs, (10, 11)))
            + f"  {p.get('decode_on', 'synthetic on device')}{_ahead(p)}"
        )
    lines += [f"{name}: failed: {error}" for name, error in report["failed_phases"].items()]
    beside = {key.removesuffix("/ceiling_before"): v for key, v in report["ratios"].items()
              if key.endswith("/ceiling_before")}
    if beside:  # --ceiling-each
        lines.append("against the ceiling measured just before each: "
                     + ", ".join(f"{name} {v:.2f}x" for name, v in beside.items()))
    pinned = report["phases"].get("ceiling_pinned")
    if pinned is not None:  # --pinned-ceiling
        cores = list((pinned.get("pinned_cores") or {}).values())  # the loop thread's first
        where = ("no thread could be pinned here" if not cores else
                 f"the loop thread on core {cores[0]}"
                 + "".join(f", a backward thread on core {core}" for core in cores[1:]))
        lines.append(f"ceiling with its launching threads held on one core each ({where}): "
                     f"{report['ratios']['ceiling_pinned/ceiling']:.2f}x the ceiling")
    flops = report["flops"]
    loader = report["loader_cpu"]
    drift = report["ceiling_drift"]
    lines.append(
        f"ceiling re-measured after the end-to-end phases: {drift:.3f}x the first "
        "(the spread between two measurements of one setting)"
    )
    if not 1 / _TRUSTED_DRIFT <= drift <= _TRUSTED_DRIFT:
        # Seen on a shared 2-core machine: a first ceiling at a seventh of its repeat put end to end at 3.6x it.
        lines.append(
            f"warning: the two ceilings differ by {max(drift, 1 / drift):.1f}x: the machine was busy or throttled "
            "while this ran, and the ratios above are not to be trusted; run again on an idle machine (on a shared "
            "CPU, --threads 1 steadies it)"
        )
    diverged = [
        f"{name} (from step {p['first_nonfinite_step']})"
        for name, p in report["phases"].items()
        if p["first_nonfinite_step"] is not None
    ]
    if diverged:
        lines.append(
            f"non-finite loss, each phase starting from the same weights: {', '.join(diverged)} "
            "(same kernels, same speed)"
        )
    ceiling = report["phases"]["ceiling"]
    if setting["compile"]:
        lines.append(
            f"first loss of the ceiling, compiled {ceiling['first_loss']:.4g} vs uncompiled "
            f"{ceiling['eager_first_loss']:.4g} (same weights and batch)"
        )
    norms = [
        f"{name} {p['max_grad_norm']:.3g}"
        + (f" ({p['nonfinite_grad_norms']} non-finite)" if p["nonfinite_grad_norms"] else "")
        for name, p in report["phases"].items()
        if p["max_grad_norm"] is not None
    ]
    if norms:
        lines.append(f"largest finite gradient norm before clipping: {', '.join(norms)}")
    lines += [
        f"{name}: conversion {_ms(p['convert_ms'])} a batch on the host ({p['convert_busy']:.0%} of the step)"
        + ("" if p["decode_ms"] is None else f"; decode {_ms(p['decode_ms'])}, augment {_ms(p['augment_ms'])}"
           + (" in the augment process" if p.get("augment_process") else ""))
        for name, p in report["phases"].items()
        if "convert_ms" in p
    ]
    lines += [
        f"{name}: the augment process held {_gib(p['augment_process_device_bytes'])} of device memory "
        "(the device's use grew by that much more than this process's allocator reserve)"
        for name, p in report["phases"].items()
        if p.get("augment_process_device_bytes") is not None
    ]
    lines += host_lines(report)
    lines += profile_lines(report["phases"])
    if report["compile_s"] is not None:
        lines.append(
            f"compile: first step took {report['compile_s']:.1f} s, the ceiling's whole warm-up "
            f"{report['phases']['ceiling']['warmup_s']:.1f} s (excluded from the timings)"
        )
    lines.append(
        f"FLOPs per image: forward {flops['forward_per_image'] / 1e9:.2f} G, "
        f"training ~{flops['train_per_image'] / 1e9:.2f} G"
    )
    line = (
        f"loader alone (cpu decode, {loader['workers']} workers): {loader['images_per_s']:.1f} img/s, "
        f"{loader['images_per_s_per_worker']:.1f} img/s per worker"
    )
    if loader.get("free_ms") is not None:
        line += (
            f"; a batch's shared memory freed in {loader['free_ms']:.2f} ms holding the GIL, or released "
            f"in {loader['release_ms']:.2f} ms without it, then freed in {loader['free_after_release_ms']:.2f}"
        )
    lines.append(line)
    data = report["data_gpu"]
    lines.append(
        f"data path alone ({data['decode_on']}, {data['device_prefetch']} batches ahead, no training): "
        f"{data['img_s']:.1f} img/s; a batch: decode {_ms(data['decode_ms'])}, augment {_ms(data['augment_ms'])}"
    )
    return "\n".join(lines)


# (key, header, digits, width) of each thread's columns in the host table
_THREAD_COLUMNS = (("cpu_ms", "cpu", 1, 7), ("runqueue_ms", "wait", 2, 8), ("sleeps", "sleeps", 1, 8),
                   ("preemptions", "preempt", 1, 8), ("migrations", "moves", 1, 8))


def host_lines(report: dict) -> list[str]:
    """What the host's CPUs did over each phase's timed steps (:mod:`mlgcn_dist.bench.host`); none for a report
    from before it was measured."""
    windows = {name: p["host"] for name, p in report["phases"].items() if p.get("host")}
    if not windows:
        return []
    setup = report.get("host") or {}
    power = [f"{count} cores {name}" for name, count in (setup.get("governors") or {}).items()]
    if setup.get("idle_states"):
        power.append("idle states " + ", ".join(f"{name} ({'?' if us is None else us} us)"
                                                for name, us in setup["idle_states"]))
    width = _name_width(windows)

    def columns(cells: list[str]) -> str:
        return "".join(f"{cell:>{w}s}" for cell, (_, _, _, w) in zip(cells, _THREAD_COLUMNS))

    head = columns([label for _, label, _, _ in _THREAD_COLUMNS])
    loop_label, backward_label = " loop:", "  backward:"  # above each thread's columns; blank in the rows
    lines = [
        f"host over the timed steps ({setup.get('cpu_model') or 'cpu model unknown'}"
        + (f"; {'; '.join(power)}" if power else "; no cpufreq or cpuidle exposed") + "): a step's ms on a core "
        "(cpu) and runnable waiting for one (wait), sleeps, preemptions and moves between cores of the loop thread "
        "and of the backward's; the process's busy cores, the host's share of busy cores, its cores' MHz at the "
        "window's end (median, and the loop's core)",
        f"  {'phase':{width}s}{loop_label}{head}{backward_label}{head}{'cores':>7s}{'host':>7s}{'MHz':>7s}"
        f"{'loop':>7s}",
    ]
    for name, w in windows.items():
        backward = w["backward"] or {}
        cells = [_host_cell(w["loop"].get(key), digits) for key, _, digits, _ in _THREAD_COLUMNS]
        cells_back = ([_host_cell(backward.get(key), digits) for key, _, digits, _ in _THREAD_COLUMNS]
                      if backward else ["in loop"] + [""] * (len(_THREAD_COLUMNS) - 1))
        lines.append(
            f"  {name:{width}s}{'':{len(loop_label)}s}{columns(cells)}{'':{len(backward_label)}s}{columns(cells_back)}"
            + f"{_host_cell(w['process_cores_busy'], 2):>7s}{_percent(w['host_busy_frac']):>7s}"
            + f"{_host_cell(w['mhz_median'], 0):>7s}{_host_cell(w['loop_core_mhz'], 0):>7s}"
        )
    return lines


def _host_cell(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def profile_lines(phases: dict[str, dict]) -> list[str]:
    """The profiled steps' device timeline per phase and the host time of the threads that launch their kernels
    (none without --profile-dir)."""
    profiled = {name: p["profile"] for name, p in phases.items() if p.get("profile")}
    if not profiled:
        return []
    first = next(iter(profiled.values()))
    traces = {str(Path(p["trace"]).parent) for p in profiled.values() if p["trace"]}
    width = _name_width(profiled)
    lines = [
        f"profiled: {first['steps']} steps after each phase's timed ones, traces in "
        f"{', '.join(sorted(traces)) or 'none'}; ms a step: the device's (any stream: window = busy + idle) and "
        "the host's inside ops of the thread that runs the loop and of the one that runs the backward:",
        f"  {'phase':{width}s}{'window':>8s}{'busy':>8s}{'idle':>8s}{'training stream':>17s}{'other streams':>15s}"
        f"{'host: loop':>12s}{'backward':>10s}",
    ]
    for name, profile in profiled.items():
        timeline, host = profile["device"], profile.get("host")
        if profile.get("error"):
            lines.append(f"  {name:{width}s} profiling failed: {profile['error']}")
            continue
        if timeline is None:
            device = f"{'no device activity recorded (no CUDA)':>56s}"
        else:
            device = "".join(f"{timeline[key]:{w}.1f}" for key, w in (("window_ms", 8), ("busy_ms", 8),
                                                                       ("idle_ms", 8), ("training_stream_ms", 17),
                                                                       ("other_streams_ms", 15)))
        loop = _cell(host["loop_thread_ms"] if host else None, 12)
        backward = _cell(host["backward_thread_ms"], 10, none="in loop") if host else _cell(None, 10)
        lines.append(f"  {name:{width}s}{device}{loop}{backward}")
    breakdowns = {name: p["host_ops"] for name, p in profiled.items() if p.get("host_ops")}
    if breakdowns:
        lines.append("host ms a step by outermost span (calls a step where more than one), and kernel launches a step:")
        for name, ops in breakdowns.items():
            lines.append(f"  {name}: {_breakdown(ops)}")
    return lines


_AUTOGRAD_NODE = "autograd::engine::evaluate_function: "


def _breakdown(ops: dict) -> str:
    """One phase's :func:`~mlgcn_dist.bench.profiling.host_breakdown` on one line."""

    def spans(rows: list[list]) -> str:
        return ", ".join(f"{span.removeprefix(_AUTOGRAD_NODE)} {ms:.1f}" + (f" (x{calls:.0f})" if calls > 1 else "")
                         for span, ms, calls in rows)

    parts = [f"loop: {spans(ops['loop'])}"]
    if ops["backward"] is not None:
        parts.append(f"backward: {spans(ops['backward'])}")
    launches = ops["launches"]
    counts = [f"loop {launches['loop']:.0f}"]
    if launches["backward"] is not None:
        counts.append(f"backward {launches['backward']:.0f}")
    counts.append(f"other threads {launches['others']:.0f}")
    parts.append(f"launches: {', '.join(counts)}")
    if gaps := ops.get("gaps"):  # reports before the gaps lack the key
        parts.append(_gaps(gaps))
    return "; ".join(parts)


def _gaps(gaps: dict) -> str:
    """:func:`~mlgcn_dist.bench.profiling.launch_gaps` as a clause."""
    if gaps["median_us"] is None:
        return "the loop's gaps between CUDA calls: none under 1 ms"
    return (f"the loop's gaps between CUDA calls, median us: {gaps['median_us']:.1f} (while other threads issue "
            f"theirs, {100 * gaps['others_working_fraction']:.0f}% of gaps: "
            f"{_cell(gaps['others_working_median_us'], 0)}; otherwise {_cell(gaps['others_quiet_median_us'], 0)})")


def _threads(report: dict) -> str:
    """The process's intra-op threads, as ", N intra-op threads" (reports before the key: nothing)."""
    threads = report.get("intra_op_threads")
    return "" if threads is None else f", {threads_phrase(threads)}"


def _cell(x: float | None, width: int, none: str = "n/a") -> str:
    return f"{none:>{width}s}" if x is None else f"{x:{width}.1f}"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} ms"


def _ahead(phase: dict) -> str:
    depth = phase.get("device_prefetch")
    ahead = "" if not depth else f", {depth} batches ahead"
    return ahead + (", steps on a side stream" if phase["train_stream"] == "side" else "")
