"""Run tracking: local metrics files on the main process, and Weights & Biases when enabled.

Files in the run directory (main process only; every other rank's :class:`Tracker` does nothing):

- ``metrics.jsonl``: one line per evaluation ``{"epoch", "step", "time", "model": {...}, "ema": {...},
  "per_class_ap": {label: AP}, "per_class_ap_ema": {...}}``; NaN (a class without positives) is written as null.
- ``train_log.jsonl``: one line per :meth:`Tracker.log_step` ``{"step", "time", **values}``.
- ``summary.json``: best mAP over the model and its EMA (``best_mAP``, ``best_epoch``, ``best_step``,
  ``best_source``, ``best_CF1``, ...), the last evaluation (``final``), ``img_per_s_window_median`` (of the logged
  ``train/img_per_s``), ``world_size``, the resolved config, git commit, system, and whatever :meth:`Tracker.finish`
  passes (its values win: the engine's ``img_per_s``, ``finished`` or ``preempted``). Rewritten atomically after
  every evaluation, so a crashed run still has one.

A requeued job appends to the same run directory: an evaluation or step logged again (the checkpoint was older than
the last lines) replaces the lines at and after it, so the files describe one consistent history.

W&B mode: ``log.wandb`` decides; its default ``auto`` takes ``WANDB_MODE`` when that is set, else disabled (a cluster
can switch tracking on without editing configs; an explicit ``disabled`` stays off). ``WANDB_MODE=offline`` or
``disabled`` also turns a config's ``online`` down (the switch of compute nodes without internet or a ``wandb login``,
and wandb's own), said once; an explicit ``offline`` or ``disabled`` stays. A W&B that fails to start, or fails
later, is off for the rest of the run, said once; the run's files go on. A default value yields to the environment for
project, entity, group, job type, run name and run id against ``WANDB_PROJECT``, ``WANDB_ENTITY``,
``WANDB_RUN_GROUP``, ``WANDB_JOB_TYPE``, ``WANDB_NAME`` and ``WANDB_RUN_ID``; ``WANDB_DIR``, when set, replaces the
run directory as W&B's directory.
The config goes to W&B nested by section (shown and filtered there as ``optim.lr``): flat keys containing dots
cannot be filtered through ``wandb.Api().runs(filters=...)`` (wandb/wandb#3087).
No environment variable is ever written to the config, the summary or the logs.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlgcn_dist.config import Config, ConfigError, LogConfig, TrainConfig
from mlgcn_dist.errors import one_line
from mlgcn_dist.files import write_text_atomic

# Metrics of AveragePrecisionMeter.compute() reported next to the best mAP (as best_<name>).
HEADLINE_METRICS = ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1")
EVAL_SOURCES = {"model": "val", "ema": "val_ema"}  # results key -> W&B prefix
THROUGHPUT_KEY = "train/img_per_s"

# WANDB_MODE values wandb accepts, mapped onto this project's three modes.
_WANDB_MODE_ALIASES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                       "disabled": "disabled"}
# Summary keys a session's end writes (Trainer._finish, Trainer._preempted). W&B keeps summary keys across the
# sessions of a resumed run, so each session starts by clearing them: a session that then crashes must not read as
# the previous one's end ("preempted", with its img_per_s; or "finished", for a finished run given more epochs).
SESSION_END_KEYS = {"finished": False, "preempted": False, "stopped": None, "img_per_s": None}


def resolve_wandb_mode(configured: str, environ: dict[str, str]) -> str:
    """``log.wandb``; for ``auto`` and ``online``, WANDB_MODE (aliases mapped) when set, else ``disabled`` and
    ``online``. Only ``online`` needs a server and a login, which a node may lack: an explicit ``offline`` or
    ``disabled`` stays (tests ask for offline runs under launch/test.sh's WANDB_MODE=disabled)."""
    if configured in ("offline", "disabled"):
        return configured
    if "WANDB_MODE" not in environ:
        return "disabled" if configured == "auto" else configured
    value = environ["WANDB_MODE"].strip().lower()
    if value not in _WANDB_MODE_ALIASES:
        raise ConfigError(f"WANDB_MODE={value!r} (log.wandb={configured}): expected one of "
                          f"{', '.join(_WANDB_MODE_ALIASES)}")
    return _WANDB_MODE_ALIASES[value]


def _prefer_env(value: Any, default: Any, env_name: str, environ: dict[str, str]) -> Any:
    """The config value, unless it is still the default and the W&B environment variable is set."""
    if value == default and environ.get(env_name):
        return environ[env_name]
    return value or None


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf as None and numpy/torch scalars and arrays as plain Python, so JSON stays standard."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(float(obj)) else None
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(obj.tolist())
    return str(obj)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of one metrics dict (per-class lists and nested dicts left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def git_state(repo_dir: Path) -> dict[str, Any]:
    """``{"git_commit", "git_dirty"}`` of the checkout holding ``repo_dir``; None values outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return {"git_commit": None, "git_dirty": None}
    diff = git("diff", "--quiet", "HEAD")
    return {"git_commit": head.stdout.strip(), "git_dirty": None if diff is None else diff.returncode == 1}


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when absent); a torn last line (a crash mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class _JsonlLog:
    """An append-only JSON-lines file whose lines are ordered by ``key``; re-logging a key replaces the lines at
    and after it (a resumed run redoing work its checkpoint did not hold)."""

    def __init__(self, path: Path, key: str) -> None:
        self.path = path
        self.key = key
        self.records = read_jsonl(path)
        if path.is_file() and not path.read_bytes().endswith(b"\n") and path.stat().st_size:
            self._rewrite()  # a torn last line (a crash mid-write): the next append would run on from it

    def append(self, record: dict[str, Any]) -> None:
        record = json_safe(record)
        if self.records and self.records[-1][self.key] >= record[self.key]:
            self.records = [r for r in self.records if r[self.key] < record[self.key]] + [record]
            self._rewrite()
            return
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def _rewrite(self) -> None:
        """The file replaced atomically by ``records``."""
        write_text_atomic(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))


def best_summary(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """``best_mAP``, ``best_epoch``, ``best_step``, ``best_source`` and ``best_<metric>`` of the evaluation with the
    highest mAP over the model and its EMA (ties keep the earlier one), from metrics.jsonl records."""
    best: tuple[dict[str, Any], str] | None = None
    for record in evals:
        for source in EVAL_SOURCES:
            value = (record.get(source) or {}).get("mAP")
            if value is not None and (best is None or value > best[0][best[1]]["mAP"]):
                best = (record, source)
    if best is None:
        return {"best_mAP": None, "best_epoch": None, "best_step": None, "best_source": None}
    record, source = best
    metrics = record[source]
    return {"best_mAP": metrics["mAP"], "best_epoch": record["epoch"], "best_step": record["step"],
            "best_source": source, **{f"best_{k}": metrics[k] for k in HEADLINE_METRICS[1:] if k in metrics}}


class Tracker:
    """Metrics files and W&B logging for one training run; a no-op on every process but the main one."""

    def __init__(self, cfg: Config, run_dir: Path, *, is_main: bool, world_size: int, label_names: list[str],
                 system: dict | None = None, resumed: bool = False) -> None:
        """``resumed``: the run goes on from a checkpoint in ``run_dir``: it continues the W&B run that
        directory's summary.json names, whatever log.run_id says (that names the W&B run of a fresh start)."""
        self.is_main = is_main
        self._finished = not is_main
        if not is_main:
            return
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.label_names = list(label_names)
        self._evals = _JsonlLog(self.run_dir / "metrics.jsonl", "epoch")
        self._steps = _JsonlLog(self.run_dir / "train_log.jsonl", "step")
        self._info = {
            "run_name": cfg.train.run_name,
            "world_size": world_size,
            **git_state(Path(__file__).resolve().parent),
            "system": dict(system or {}),
        }
        previous_id = self._previous_wandb_id() if resumed else ""
        self._run = self._start_wandb(previous_id)
        # A session with W&B off still names the directory's W&B run, so the next session with W&B on continues it
        # instead of opening another.
        if run_id := self._run.id if self._run is not None else previous_id:
            self._info["wandb_run_id"] = run_id
        self._write_summary({})

    # -- W&B -------------------------------------------------------------------------------------------------

    def _previous_wandb_id(self) -> str:
        try:
            return str(json.loads((self.run_dir / "summary.json").read_text()).get("wandb_run_id") or "")
        except (OSError, ValueError):  # no summary yet, or one torn by a kill: a new W&B run
            return ""

    def _start_wandb(self, previous_id: str) -> Any:
        """The W&B run of this session, or None: disabled, or its start failed (said once; the files go on)."""
        environ = dict(os.environ)
        configured = self.cfg.log.wandb
        mode = resolve_wandb_mode(configured, environ)
        if configured not in ("auto", mode):
            print(f"W&B: WANDB_MODE={environ['WANDB_MODE']} in the environment turns log.wandb={configured} into "
                  f"{mode}", flush=True)
        if mode == "disabled":
            return None
        try:
            return self._init_wandb(mode, previous_id, environ)
        except Exception as err:  # no login (UsageError), no network (CommError), ...: W&B only holds a copy
            self._turn_wandb_off("start", err)
            return None

    def _init_wandb(self, mode: str, previous_id: str, environ: dict[str, str]) -> Any:
        import wandb  # only here: a disabled run must not pay for (or depend on) importing wandb

        log, defaults = self.cfg.log, LogConfig()
        configured_id = _prefer_env(log.run_id, defaults.run_id, "WANDB_RUN_ID", environ)
        if previous_id and configured_id and configured_id != previous_id:
            # A new SLURM job continuing a cancelled one's directory (train.output_dir) names its own job's id.
            print(f"W&B: continuing run {previous_id}, which {self.run_dir} logs to (log.run_id={configured_id} "
                  "names the W&B run of a fresh start)", flush=True)
        run = wandb.init(
            mode=mode,
            project=_prefer_env(log.project, defaults.project, "WANDB_PROJECT", environ),
            entity=_prefer_env(log.entity, defaults.entity, "WANDB_ENTITY", environ),
            group=_prefer_env(log.group, defaults.group, "WANDB_RUN_GROUP", environ),
            job_type=_prefer_env(log.job_type, defaults.job_type, "WANDB_JOB_TYPE", environ),
            name=_prefer_env(self.cfg.train.run_name, TrainConfig().run_name, "WANDB_NAME", environ),
            # A resumed run continues the W&B run of its directory; a requeued SLURM job's is its log.run_id.
            id=previous_id or configured_id or None,
            tags=log.tags or None,
            resume="allow",  # a requeued job with the same id continues the same run
            dir=None if environ.get("WANDB_DIR") else str(self.run_dir),
            config={**self.cfg.to_dict(), "runtime": json_safe({k: v for k, v in self._info.items()
                                                                 if k != "run_name"})},
        )
        run.define_metric("epoch")
        for prefix in EVAL_SOURCES.values():
            run.define_metric(f"{prefix}/*", step_metric="epoch")
            run.define_metric(f"{prefix}/mAP", step_metric="epoch", summary="max")
        run.summary.update(SESSION_END_KEYS)
        return run

    def _wandb_eval_payload(self, epoch: int, results: dict[str, dict]) -> dict[str, Any]:
        import wandb

        payload: dict[str, Any] = {"epoch": epoch}
        for source, prefix in EVAL_SOURCES.items():
            metrics = results.get(source)
            if not metrics:
                continue
            payload.update({f"{prefix}/{k}": v for k, v in scalar_metrics(metrics).items()})
            payload.update({f"{prefix}/top3/{k}": v for k, v in scalar_metrics(metrics.get("top3", {})).items()})
        ema_ap = results["ema"]["ap"] if results.get("ema") else [None] * len(self.label_names)
        rows = [[name, json_safe(ap), json_safe(ap_ema)]
                for name, ap, ap_ema in zip(self.label_names, results["model"]["ap"], ema_ap)]
        payload[f"{EVAL_SOURCES['model']}/per_class_ap"] = wandb.Table(columns=["label", "AP", "AP_ema"], data=rows)
        return payload

    # -- public API --------------------------------------------------------------------------------------------

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Training values at global ``step`` (loss, learning rates, throughput, ...)."""
        if not self.is_main:
            return
        self._steps.append({"step": step, "time": time.time(), **values})
        self._to_wandb("log", lambda run: run.log(dict(values), step=step))

    def log_eval(self, epoch: int, step: int, results: dict[str, dict]) -> None:
        """One evaluation: ``results = {"model": metrics, "ema": metrics (optional)}``, each from
        ``AveragePrecisionMeter.compute()`` plus ``"top3"`` holding ``compute(top_k=3)``."""
        if not self.is_main:
            return
        record: dict[str, Any] = {"epoch": epoch, "step": step, "time": time.time()}
        for source in EVAL_SOURCES:
            metrics = results.get(source)
            if not metrics:
                continue
            if len(metrics["ap"]) != len(self.label_names):
                raise ValueError(f"log_eval: results['{source}']['ap'] has {len(metrics['ap'])} values for "
                                 f"{len(self.label_names)} label names")
            record[source] = {k: v for k, v in metrics.items() if k != "ap"}
            record[source]["top3"] = scalar_metrics(metrics.get("top3", {}))
            suffix = "" if source == "model" else f"_{source}"
            record[f"per_class_ap{suffix}"] = dict(zip(self.label_names, metrics["ap"]))
        self._evals.append(record)
        self._write_summary({})

        def log(run: Any) -> None:
            # W&B drops a step below its own, which after a resume starts past the run's last logged step (the
            # evaluated one, if a preemption came between the epoch's last step and its evaluation). Charts plot
            # evaluations against "epoch" (define_metric), so a later W&B step changes nothing shown.
            run.log(self._wandb_eval_payload(epoch, results), step=max(step, run.step))
            run.summary.update(best_summary(self._evals.records))

        self._to_wandb("log", log)

    def log_checkpoint(self, path: Path, epoch: int, is_best: bool) -> None:
        """Record a saved checkpoint (file or directory) in W&B as a reference artifact (``log.log_artifact``);
        the bytes stay where they are."""
        if not self.is_main or self._run is None or not self.cfg.log.log_artifact:
            return
        import wandb

        path = Path(path).resolve()

        def log_artifact(run: Any) -> None:
            artifact = wandb.Artifact(f"checkpoint-{run.id}", type="model", metadata={"epoch": epoch})
            artifact.add_reference(path.as_uri(), name=path.name)
            run.log_artifact(artifact, aliases=["latest", f"epoch-{epoch}"] + (["best"] if is_best else []))

        self._to_wandb("log_artifact", log_artifact)

    def finish(self, summary: dict) -> None:
        """Write summary.json (``summary`` merged over the tracked values) and close the W&B run; later calls do
        nothing."""
        if self._finished:
            return
        self._finished = True
        merged = self._write_summary(summary)
        self._to_wandb("summary", lambda run: run.summary.update({k: v for k, v in merged.items() if k != "config"}))
        self._to_wandb("finish", lambda run: run.finish())

    def _to_wandb(self, what: str, call: Callable[[Any], object]) -> None:
        """``call(run)`` unless W&B is off. W&B holds a copy of what the run's files hold, and a failure of it must
        not end training before its checkpoint is saved: a scancel or preemption signals every process of the job,
        W&B's service process too, and the trainer's next call then finds no service. The first failure is
        reported and turns W&B off for the rest of the run; metrics.jsonl, train_log.jsonl and summary.json go
        on."""
        if self._run is None:
            return
        try:
            call(self._run)
        except Exception as err:  # whatever W&B raises: the run must go on to its checkpoint
            self._run = None
            self._turn_wandb_off(what, err)

    def _turn_wandb_off(self, what: str, err: Exception) -> None:
        print(f"W&B {what} failed ({one_line(err)}); W&B logging is off for the rest of this run, its files in "
              f"{self.run_dir} go on", file=sys.stderr, flush=True)
        try:  # now, or W&B's exit hook fails the same way at exit, with a traceback
            import wandb

            wandb.teardown()
        except Exception:  # a service already gone, or no wandb to import
            pass

    def _write_summary(self, extra: dict) -> dict[str, Any]:
        last = self._evals.records[-1] if self._evals.records else {}
        throughput = [r[THROUGHPUT_KEY] for r in self._steps.records if r.get(THROUGHPUT_KEY) is not None]
        summary = {
            **best_summary(self._evals.records),
            "final": {k: last[k] for k in ("epoch", *EVAL_SOURCES) if k in last},
            # Not img_per_s: that is the whole run's images over its epochs' time, which only the engine's finish
            # and preemption know; the windows' median is higher (no loader start-up) and would not compare with it.
            "img_per_s_window_median": statistics.median(throughput) if throughput else None,
            **self._info,
            "config": self.cfg.to_dict(),
            **extra,
        }
        summary = json_safe(summary)
        write_json_atomic(self.run_dir / "summary.json", summary)
        return summary
