"""``mlgcn compare``: runs side by side (config differences, best mAP, F1, throughput, processes) and their mAP curves.

Runs come from local run directories (summary.json + metrics.jsonl written by :mod:`mlgcn_dist.tracking`), from a
W&B project through ``wandb.Api``, or from W&B's own run files (``offline-run-*/run-*.wandb``), read back here so
offline runs can be compared without a server and without ``wandb sync``.

A ``.wandb`` file is W&B's record log: a 7-byte header (``:W&B``, magic 0xBEE1 little-endian, version 0), then
32 KiB blocks of records, each a 7-byte header (CRC-32 of type byte + payload, payload length uint16, type:
1 full, 2 first, 3 middle, 4 last fragment) and a payload; a block tail under 7 bytes is padding. Joined payloads
are ``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import math
import re
import struct
import sys
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlgcn_dist.config import Config, ConfigError, flatten_config, get_key, read_yaml_value, set_key
from mlgcn_dist.tracking import EVAL_SOURCES, read_jsonl

# Table columns: column name -> summary key it shows (name, config and status are computed from the run itself).
SUMMARY_COLUMNS = {"best_mAP": "best_mAP", "CF1": "best_CF1", "OF1": "best_OF1", "img_per_s": "img_per_s",
                   "procs": "world_size"}  # processes: one per GPU on CUDA
DEFAULT_COLUMNS = ("name", "config", *SUMMARY_COLUMNS, "status")
DECIMAL_COLUMNS = frozenset(SUMMARY_COLUMNS) - {"procs"}  # shown with two decimals (W&B returns 61.0 as 61)
TEXT_COLUMNS = ("name", "config", "status")  # sorted ascending, as config values are
# Keys that differ between any two runs by construction: they would fill the config column with noise.
IDENTITY_KEYS = frozenset({"train.run_name", "train.output_dir", "log.run_id"})
# The SLURM script's markers in a run directory, and what each tells of a preempted run: REQUEUE, the trainers' ask
# to be requeued, is renamed by the script when SLURM ended the job instead (scancel, preemption, time limit).
REQUEUE_MARKERS = {"REQUEUE": "requeue pending", "REQUEUE.terminated": "job ended"}

_WANDB_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK_SIZE = 32 * 1024
_RECORD_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _LAST = 1, 2, 4  # record types; 3 (a middle fragment) is only appended


@dataclass
class RunRecord:
    name: str
    source: str  # where it was read from: a run directory, a .wandb file or a W&B run path
    config: dict[str, Any]  # flattened "section.key" -> value
    summary: dict[str, Any]  # best_mAP, best_CF1, best_OF1, best_epoch, img_per_s, world_size, ...
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # model|ema -> [(epoch, mAP)]
    requeue: str = ""  # what a preempted run directory's marker tells (REQUEUE_MARKERS); "" without one
    status: str = ""  # what its source alone tells (a run directory without summary.json), over run_status's


def _curve(points: Iterable[tuple[Any, Any]]) -> list[tuple[int, float]]:
    """(epoch, mAP) pairs sorted by epoch; a repeated epoch keeps its last value, missing values are dropped."""
    by_epoch = {int(e): float(v) for e, v in points if e is not None and v is not None and math.isfinite(v)}
    return sorted(by_epoch.items())


# -- local run directories ------------------------------------------------------------------------------------


# The engine's Tracker writes summary.json as it starts; before that (the setup: data, model, resume checks, then
# W&B's start) a run directory holds only the main process's .lock (RunLock, taken first) and, once set up,
# config.yaml. The rest comes after summary.json: a run directory holding one of them had a summary, since removed.
SETUP_FILES = (".lock", "config.yaml")
PAST_SETUP = ("metrics.jsonl", "train_log.jsonl", "checkpoints")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a file only a run writes; a directory without any is someone else's."""
    return any((path / name).exists() for name in ("summary.json", *SETUP_FILES, *PAST_SETUP))


def _read_summary(run_dir: Path) -> tuple[dict[str, Any], str]:
    """summary.json, else the config the run saved (``{"config": ...}``; ``{}`` without it); and the status that
    tells a run without a summary apart ("" with one). summary.json is looked for once: a run starting now could
    write it between two looks, and be listed with its config alone and no status."""
    path = run_dir / "summary.json"
    try:
        if path.is_file():
            return json.loads(path.read_text()), ""
        path = run_dir / "config.yaml"
        saved = {"config": yaml.safe_load(path.read_text()) or {}} if path.is_file() else {}
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = path.suffix[1:].upper()
        raise ValueError(f"{path}: not valid {kind} ({err}); a run killed while writing it?") from err
    if any((run_dir / name).exists() for name in PAST_SETUP):
        return saved, "no summary: removed after training began"
    return saved, "no summary: not past setup"


def _read_local_run(run_dir: Path) -> RunRecord:
    summary, status = _read_summary(run_dir)
    config = flatten_config(summary.get("config", {}))
    evals = read_jsonl(run_dir / "metrics.jsonl")
    curves = {source: _curve((r["epoch"], (r.get(source) or {}).get("mAP")) for r in evals)
              for source in EVAL_SOURCES}
    return RunRecord(
        name=summary.get("run_name") or config.get("train.run_name") or run_dir.name,
        source=str(run_dir),
        config=config,
        summary={k: v for k, v in summary.items() if k != "config"},
        curves={k: v for k, v in curves.items() if v},
        requeue=next((told for name, told in REQUEUE_MARKERS.items() if (run_dir / name).is_file()), ""),
        status=status,
    )


def collect_local_runs(paths: list[Path]) -> list[RunRecord]:
    """Each path is a run directory (:func:`is_run_dir`: one killed before it wrote summary.json counts too) or a
    directory of run directories; a run reached twice (``runs/a runs/a``, or ``runs/ runs/a``) is read once."""
    run_dirs: dict[Path, Path] = {}  # resolved -> as given
    for path in map(Path, paths):
        if is_run_dir(path):
            run_dirs.setdefault(path.resolve(), path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p)) if path.is_dir() else []
        if not children:
            raise ValueError(f"{path}: no run found (expected summary.json, config.yaml or checkpoints/ in it or in "
                             "its subdirectories)")
        for child in children:
            run_dirs.setdefault(child.resolve(), child)
    return [_read_local_run(run_dir) for run_dir in run_dirs.values()]


# -- W&B run files (offline runs, or the local copy of online ones) --------------------------------------------


def read_wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` file in order; stops with a warning at a torn or corrupt record
    (a run killed mid-write) so everything before it is still usable."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_WANDB_FILE_HEADER):
        raise ValueError(f"{path}: not a W&B run file (expected the header {_WANDB_FILE_HEADER!r})")
    pos, pending = len(_WANDB_FILE_HEADER), b""
    while pos + _RECORD_HEADER.size <= len(data):
        block_left = _BLOCK_SIZE - pos % _BLOCK_SIZE
        if block_left < _RECORD_HEADER.size:
            pos += block_left
            continue
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        payload = data[pos + _RECORD_HEADER.size: pos + _RECORD_HEADER.size + length]
        if len(payload) < length or zlib.crc32(payload, zlib.crc32(bytes([kind]))) != checksum:
            warnings.warn(f"{path}: torn or corrupt record at byte {pos}; reading stops there", stacklevel=2)
            return
        pos += _RECORD_HEADER.size + length
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _apply_items(target: dict[str, Any], items: Iterable[Any]) -> None:
    """Apply W&B key/value items (a ``key`` or a ``nested_key`` path, and a JSON value) to a dict."""
    for item in items:
        keys = [item.key] if item.key else list(item.nested_key)
        node = target
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = json.loads(item.value_json)


@dataclass
class _WandbRunState:
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def read(self, path: Path) -> None:
        for record in read_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.name = record.run.display_name or record.run.run_id
                _apply_items(self.config, record.run.config.update)
                _apply_items(self.summary, record.run.summary.update)
            elif kind == "config":
                _apply_items(self.config, record.config.update)
            elif kind == "summary":
                _apply_items(self.summary, record.summary.update)
            elif kind == "history":
                row: dict[str, Any] = {}
                _apply_items(row, record.history.item)
                self.history.append(row)
        self.files.append(str(path))

    def to_run(self) -> RunRecord:
        curves = {source: _curve((r.get("epoch"), r.get(f"{prefix}/mAP")) for r in self.history)
                  for source, prefix in EVAL_SOURCES.items()}
        return RunRecord(
            name=self.name,
            source=self.files[-1],
            config=flatten_config({k: v for k, v in self.config.items() if not k.startswith("_")}),
            summary={k: v for k, v in self.summary.items() if not k.startswith("_")},
            curves={k: v for k, v in curves.items() if v},
        )


def _wandb_run_files(wandb_dir: Path) -> list[Path]:
    files = [*wandb_dir.glob("*run-*/run-*.wandb"), *wandb_dir.glob("wandb/*run-*/run-*.wandb"),
             *wandb_dir.glob("*/wandb/*run-*/run-*.wandb")]  # a directory of run directories (runs/)
    if not files:
        raise ValueError(f"{wandb_dir}: no W&B run files (expected offline-run-*/run-*.wandb in it, in wandb/ or in "
                         "*/wandb/)")
    return files


def collect_offline_wandb_runs(*wandb_dirs: Path) -> list[RunRecord]:
    """Runs from W&B run directories (``[offline-]run-<time>-<id>/run-<id>.wandb``) under each of ``wandb_dirs``,
    its ``wandb/`` subdirectory or ``*/wandb/``. Directories of one run id (a requeued job resumed the run) are read
    in time order into one record; a file reached twice is read once."""
    files = {path.resolve(): path for wandb_dir in wandb_dirs for path in _wandb_run_files(Path(wandb_dir))}
    states: dict[str, _WandbRunState] = {}
    for path in sorted(files.values(), key=lambda p: p.parent.name.removeprefix("offline-")):
        run_id = path.stem.removeprefix("run-")
        # Named by its id until its run record says otherwise: a run killed at once holds no record at all.
        states.setdefault(run_id, _WandbRunState(name=run_id)).read(path)
    return [state.to_run() for state in states.values()]


# -- W&B server ----------------------------------------------------------------------------------------------


def collect_wandb_runs(path: str, filters: dict | None = None, *, curves: bool = False) -> list[RunRecord]:
    """Runs of W&B project ``entity/project`` matching ``filters`` (W&B's MongoDB-style run filters), best mAP
    first. ``curves`` also fetches each run's mAP per epoch (two history queries per run)."""
    import wandb

    try:
        found = list(wandb.Api().runs(path, filters=filters or {}, order="-summary_metrics.best_mAP"))
    except wandb.errors.Error as err:  # no login, no network, no such project: say so, not a traceback
        raise ValueError(f"W&B project {path!r}: {err} (log in with `wandb login`, or compare local runs or "
                         "--wandb-offline files)") from err
    runs = []
    for run in found:
        record = RunRecord(
            name=run.name or run.id,
            source=f"{path}/{run.id}",
            config=flatten_config({k: v for k, v in run.config.items() if not k.startswith("_")}),
            summary={k: v for k, v in run.summary_metrics.items() if not k.startswith("_")},
        )
        if curves:
            for source, prefix in EVAL_SOURCES.items():
                key = f"{prefix}/mAP"
                points = _curve((row.get("epoch"), row.get(key)) for row in run.scan_history(keys=["epoch", key]))
                if points:
                    record.curves[source] = points
        runs.append(record)
    return runs


# -- filters --------------------------------------------------------------------------------------------------


def parse_filters(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "model.head=gcn"]`` -> ``{"optim.lr": 0.1, "model.head": "gcn"}`` (YAML-typed values)."""
    conditions = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--filter '{item}': expected key=value, e.g. optim.lr=0.1")
        conditions[key.strip()] = _filter_value(key.strip(), value)
    return conditions


_EXPONENT_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def _filter_value(key: str, text: str) -> Any:
    """``text`` as the training override ``key=text`` sets it (``optim.epoch_step=8`` is [8], ``optim.lr=1e-4``
    the number, ``train.run_name=007`` the text); for a summary key, or a config key of another version, typed as
    YAML, with 1e-4 (a string in YAML 1.1, which wants a dot in a float) the number."""
    with contextlib.suppress(ConfigError):  # a key this version's config has not: typed below
        probe = Config()
        set_key(probe, key, text, f"--filter {key}={text}")
        return get_key(probe, key)
    value = read_yaml_value(text) if text else text
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def wandb_filters(conditions: dict[str, Any]) -> dict[str, Any]:
    """The same conditions as W&B run filters: config sections under ``config.``, anything else a summary key."""
    return {
        (f"config.{key}" if key.split(".")[0] in Config.__dataclass_fields__ else f"summary_metrics.{key}"): value
        for key, value in conditions.items()
    }


def _value(run: RunRecord, key: str) -> Any:
    """The run's config value of ``key``, else its summary value (None when it has neither)."""
    return run.config[key] if key in run.config else run.summary.get(key)


def filter_runs(runs: list[RunRecord], conditions: dict[str, Any]) -> list[RunRecord]:
    """Runs whose config (or summary) value equals every condition."""
    return [run for run in runs if all(_value(run, key) == value for key, value in conditions.items())]


def why_nothing_matched(runs: list[RunRecord], conditions: dict[str, Any]) -> str:
    """Why ``filter_runs(runs, conditions)`` holds no run: none read, a key no run has (with the nearest keys), a
    value no run has (with the values they have), or conditions that no run meets together."""
    if not runs:
        return ("none read (give run directories, --wandb or --wandb-offline; --wandb reads only the project's runs "
                "that match --filter)")
    for key, wanted in conditions.items():
        values = sorted({_format_value(_value(run, key)) for run in runs if key in run.config or key in run.summary})
        if not values:
            known = {k for run in runs for k in (*run.config, *run.summary)}
            nearest = difflib.get_close_matches(key, known, n=3)
            hint = (f"did you mean {', '.join(nearest)}?" if nearest
                    else "keys are config keys, section.key as in optim.lr, or summary keys as in best_mAP")
            return f"--filter {key}: no run has this key ({hint})"
        if not filter_runs(runs, {key: wanted}):
            shown = ", ".join(values[:8]) + (", ..." if len(values) > 8 else "")
            return f"--filter {key}={_format_value(wanted)} matches none of the {len(runs)} runs (their values: {shown})"
    together = " ".join(f"{key}={_format_value(value)}" for key, value in conditions.items())
    return f"no run matches all of --filter {together} together"


# -- table and plot --------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # short (61 for 61.0) unless that is another number (0.999997 for 0.9999975)
        text = f"{value:g}"
        return text if float(text) == value else repr(value)
    if isinstance(value, list):  # as a --filter value is written: optim.epoch_step=[8,12] selects [8, 12]
        return "[" + ",".join(map(_format_value, value)) + "]"
    return str(value)


def config_differences(runs: list[RunRecord]) -> list[str]:
    """Config keys (of the Config sections) whose values are not the same in all ``runs``, in sorted order."""
    configured = [run for run in runs if run.config]  # a W&B run killed before it logged its config has none
    keys = {k for run in configured for k in run.config
            if k.split(".")[0] in Config.__dataclass_fields__ and k not in IDENTITY_KEYS}
    return sorted(k for k in keys if len({json.dumps(run.config.get(k), sort_keys=True) for run in configured}) > 1)


def _cell(run: RunRecord, column: str, diff_keys: list[str]) -> Any:
    if column == "name":
        return run.name
    if column == "config":
        return " ".join(f"{k}={_format_value(run.config[k])}" for k in diff_keys if k in run.config)
    if column == "img_per_s":
        return run_img_per_s(run.summary)
    if column in SUMMARY_COLUMNS:
        return run.summary.get(SUMMARY_COLUMNS[column])
    if column == "status":
        return run_status(run)
    return _value(run, column)


def run_img_per_s(summary: dict[str, Any]) -> Any:
    """The run's img_per_s (every image over the epochs' wall time), which the engine writes next to
    ``img_per_s_window_median``. A summary with img_per_s alone holds the logging windows' median under that name
    (the tracker's before 2026-11-27, of a killed or running run; the engine's before 2026-11-26): a higher rate that
    would not compare with the others, so None."""
    return summary.get("img_per_s") if "img_per_s_window_median" in summary else None


def is_finished(summary: dict[str, Any]) -> bool:
    """The engine's ``finished``, which the tracker sets False in W&B's summary at every session's start (W&B keeps
    summary keys across sessions); a summary without it is of a run from before 2026-11-27, finished when it holds
    the label-frequency baseline that only the engine's finish writes."""
    if "finished" in summary:
        return bool(summary["finished"])
    return "frequency_baseline_mAP" in summary


def run_status(run: RunRecord) -> str:
    """finished, preempted (requeue pending while its REQUEUE marker is there, job ended once the SLURM script
    renamed it), stopped (Ctrl-C), incomplete: epoch k of N (k epochs evaluated; killed, or still running), no
    data, or what its source told (``RunRecord.status``)."""
    if run.status:
        return run.status
    if not (run.config or run.summary or run.curves):
        return "no data"
    # Before "preempted": a W&B run finished before 2026-11-27 after a preemption still holds that session's flag.
    if is_finished(run.summary):
        return "finished"
    if run.summary.get("preempted"):
        return f"preempted ({run.requeue})" if run.requeue else "preempted"
    if run.summary.get("stopped"):  # by Ctrl-C: saved, resumed by hand
        return f"stopped ({run.summary['stopped']})"
    # The last evaluated epoch: metrics.jsonl or W&B history, else the last "epoch" W&B keeps in its summary.
    last = max((points[-1][0] for points in run.curves.values()), default=run.summary.get("epoch"))
    evaluated = int(last) + 1 if isinstance(last, (int, float)) else "?"
    return f"incomplete: epoch {evaluated} of {run.config.get('train.epochs', '?')}"


def _sort_runs(runs: list[RunRecord], column: str, diff_keys: list[str]) -> list[RunRecord]:
    """Metrics (summary values) descending, names and config values ascending; runs without a value last."""
    known = {*DEFAULT_COLUMNS, *(k for run in runs for k in (*run.config, *run.summary))}
    if column not in known:
        raise ValueError(f"--sort '{column}': not a column ({', '.join(DEFAULT_COLUMNS)}), config key or summary key")
    descending = column not in TEXT_COLUMNS and not any(column in run.config for run in runs)
    present = [r for r in runs if _sort_value(_cell(r, column, diff_keys)) is not None]
    missing = [r for r in runs if _sort_value(_cell(r, column, diff_keys)) is None]
    try:
        ordered = sorted(present, key=lambda r: _sort_value(_cell(r, column, diff_keys)), reverse=descending)
    except TypeError:  # values of mixed types (e.g. a key whose type changed between versions)
        ordered = sorted(present, key=lambda r: str(_cell(r, column, diff_keys)), reverse=descending)
    return ordered + missing


# The aggregates W&B keeps as a metric's summary when define_metric(summary=...) names them.
_WANDB_METRIC_SUMMARIES = frozenset({"min", "max", "mean", "last", "first", "best"})


def _sort_value(value: Any) -> Any:
    """``value``, or the number of a W&B metric summary of one aggregate: val/mAP is {"max": 61.2}
    (the tracker's define_metric(summary="max")), and dicts would sort by their text, 9.5 above 10.0."""
    if isinstance(value, dict) and len(value) == 1 and set(value) <= _WANDB_METRIC_SUMMARIES:
        return next(iter(value.values()))
    return value


def format_table(runs: list[RunRecord], sort_by: str = "best_mAP",
                 columns: tuple[str, ...] = DEFAULT_COLUMNS) -> str:
    """A plain-text table of ``runs``, one row each, sorted by ``sort_by`` (any column, config or summary key)."""
    diff_keys = config_differences(runs)
    ordered = _sort_runs(runs, sort_by, diff_keys)
    rows = [list(columns)] + [[_format_cell(_cell(run, c, diff_keys), c) for c in columns] for run in ordered]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_cell(value: Any, column: str) -> str:
    """Metrics to two decimals; everything else as in the config column."""
    if column in DECIMAL_COLUMNS and isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.2f}"
    return _format_value(value) or "-"


def plot_map_curves(runs: list[RunRecord], out_png: Path) -> Path:
    """Write a PNG of mAP per epoch: one colour per run, the EMA model dashed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise RuntimeError("plotting needs matplotlib: pip install 'mlgcn-dist[plot]'") from err
    plotted = [run for run in runs if run.curves]
    if not plotted:
        raise ValueError("plot: none of the chosen runs has an evaluation (metrics.jsonl / val/mAP history empty)")
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)  # the Agg canvas, chosen here rather than through pyplot's global backend
    ax = fig.add_subplot()
    for index, run in enumerate(plotted):
        color = f"C{index % 10}"
        for source, style in (("model", "-"), ("ema", "--")):
            points = run.curves.get(source)
            if points:
                label = run.name if source == "model" else f"{run.name} (EMA)"
                ax.plot(*zip(*points), style, color=color, marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mAP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    return out_png


# -- command line --------------------------------------------------------------------------------------------


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", type=Path,
                        help="run directories, or directories holding run directories; a run given twice is listed "
                             "once. Each row's status: finished, preempted (requeue pending: its REQUEUE marker is "
                             "there; job ended: SLURM ended the job instead, resubmit with train.output_dir=<run dir>; "
                             "a W&B run, which holds no marker, says preempted), stopped (Ctrl-C): saved, to be "
                             "resumed by hand, incomplete: epoch k of N (k epochs evaluated; killed, or still "
                             "running), no summary: not past setup (a run directory "
                             "without summary.json: failed, killed or still starting before tracking began), or no "
                             "data (default: none)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT",
                        help="also compare the runs of this W&B project, --filter applied by W&B (needs `wandb "
                             "login`; default: none)")
    parser.add_argument("--wandb-offline", metavar="DIR", type=Path, action="append", default=[],
                        help="also compare the W&B run files (offline-run-*/run-*.wandb) in DIR, DIR/wandb or "
                             "DIR/*/wandb; repeatable (default: none)")
    parser.add_argument("--filter", metavar="KEY=VALUE", action="append", default=[],
                        help="keep the runs whose config (or summary) KEY equals VALUE, e.g. model.head=gcn; VALUE "
                             "is YAML, written as the config column shows it (a list as optim.epoch_step=[8,12]); "
                             "repeatable, every one must hold (default: keep every run)")
    parser.add_argument("--sort", default="best_mAP",
                        help=f"sort column: {', '.join(DEFAULT_COLUMNS)}, or any config/summary key; metrics "
                             "descending, names, status and config values ascending (default: %(default)s)")
    parser.add_argument("--plot", metavar="OUT.png", type=Path,
                        help="also write mAP per epoch of these runs to OUT.png, the EMA model dashed "
                             "(default: no plot)")


def with_distinct_names(runs: list[RunRecord]) -> list[RunRecord]:
    """``runs``, each run whose name another shares (every run left at train.run_name=run) named with where it
    was read from as well, so that the table's rows and the plot's lines can be told apart."""
    counts = Counter(run.name for run in runs)
    return [dataclasses.replace(run, name=f"{run.name} [{run.source}]") if counts[run.name] > 1 else run
            for run in runs]


def run_compare(args: argparse.Namespace) -> int:
    """Collect, filter, print the table and optionally plot; returns the exit status."""
    conditions = parse_filters(args.filter)
    read = collect_local_runs(args.runs) if args.runs else []
    if args.wandb_offline:
        read += collect_offline_wandb_runs(*args.wandb_offline)
    if args.wandb:
        read += collect_wandb_runs(args.wandb, wandb_filters(conditions), curves=args.plot is not None)
    runs = with_distinct_names(filter_runs(read, conditions))
    if not runs:
        print(f"compare: no runs to compare: {why_nothing_matched(read, conditions)}", file=sys.stderr)
        return 1
    print(format_table(runs, sort_by=args.sort))
    if args.plot is not None:
        print(f"wrote {plot_map_curves(runs, args.plot)}")
    return 0
