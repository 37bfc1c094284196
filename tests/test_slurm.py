"""The sbatch scripts in slurm/: the launch command they build, when they requeue, and real jobs on a local SLURM.

The fast tests run ``slurm/coco_gcn.sh`` with bash under a fake SLURM environment whose ``srun``, ``scontrol`` and
``accelerate`` are stubs that record what they were given. The slow tests start a real one-node SLURM (needs root;
tests/slurm_cluster.py installs it with apt-get when missing) and submit the real script to train on the toy set
with two CPU processes: once to the end, once preempted by SIGUSR1 to check the save-requeue-resume loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster, wait_until

from mlgcn_dist.compare import collect_local_runs, run_status

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "coco_gcn.sh"
SINGLE_NODE_SCRIPT = REPO / "slurm" / "single_node.sh"
SIGUSR1_BIT = 1 << (10 - 1)  # bit of SIGUSR1 (10 on Linux) in /proc/<pid>/status SigIgn
SIGUSR2_BIT = 1 << (12 - 1)

# srun stub: record the options, then run the command once per node as SLURM would, with SLURM_NODEID set.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == -* ]]; do echo "$1" >> "$STUB_LOG/srun.flags"; shift; done
rc=0
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || rc=$?; done
exit $rc
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1" in
  show) for host in $STUB_HOSTS; do echo "$host"; done ;;
  requeue) echo "$2" >> "$STUB_LOG/requeued" ;;
esac
"""
# accelerate stub: record argv, the ignored-signal mask and the elastic agent's shutdown timeout; like a preempted
# trainer, optionally leave the marker. STUB_BATCH_PID is the batch shell, the job's first process (fake_job).
FAKE_ACCELERATE = """#!/usr/bin/env bash
node=$SLURM_NODEID
printf '%s\\n' "$@" > "$STUB_LOG/accelerate.$node"
grep SigIgn /proc/$$/status | cut -f2 > "$STUB_LOG/sigign.$node"
echo "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT-unset}" > "$STUB_LOG/shutdown_timeout.$node"
# SIGUSR1s to the batch shell while the step runs (--signal=B:USR1 and a `scancel --batch --signal=USR1` after it),
# further apart than its trap takes to pass one on.
for ((i = 0; node == 0 && i < ${STUB_USR1_DURING:-0}; i++)); do kill -USR1 "$STUB_BATCH_PID"; sleep 0.7; done
if [[ -n "${STUB_MARKER:-}" ]]; then
  for arg in "$@"; do case "$arg" in train.output_dir=*) dir="${arg#*=}" ;; esac; done
  mkdir -p "$dir" && echo preempted > "$dir/REQUEUE"
fi
# Like scancel, which SIGTERMs every process of the batch step: the batch shell and its children but srun, whose
# tasks (this stub) carry on with their save.
if [[ -n "${STUB_TERM_BATCH:-}" ]]; then
  kill -TERM "$STUB_BATCH_PID"
  for pid in $(pgrep -P "$STUB_BATCH_PID"); do [[ $pid == "$PPID" ]] || kill -TERM "$pid"; done
fi
# USR1 to the batch shell as the last node ends (--signal=B:USR1 landing just as the step fails).
[[ -z "${STUB_USR1_BATCH:-}" || $node != $((SLURM_NNODES - 1)) ]] || kill -USR1 "$STUB_BATCH_PID"
# A burst of SIGTERMs to the batch shell that outlasts the step: some land just as srun ends.
[[ -z "${STUB_TERM_BURST:-}" ]] || (for _ in {1..2000}; do kill -TERM "$STUB_BATCH_PID" 2>/dev/null || exit; done) &
exit "${STUB_EXIT:-0}"
"""
# scancel stub: the batch shell's USR1 trap calls it; it takes a while, as a real one asking slurmctld does.
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "$@" >> "$STUB_LOG/scancel"
sleep 0.5
"""


def _write_exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def fake_job(tmp_path: Path) -> Callable[..., tuple[subprocess.CompletedProcess, Path]]:
    """Run coco_gcn.sh as job 4242 on nodes gpu07 and gpu08 (4 GPUs each); returns (result, stub log dir)."""
    log = tmp_path / "log"
    log.mkdir()
    _write_exe(tmp_path / "bin" / "srun", FAKE_SRUN)
    _write_exe(tmp_path / "bin" / "scontrol", FAKE_SCONTROL)
    _write_exe(tmp_path / "bin" / "scancel", FAKE_SCANCEL)
    _write_exe(tmp_path / "venv" / "bin" / "accelerate", FAKE_ACCELERATE)

    def run(*args: str, script: Path = SCRIPT, spooled: bool = False,
            **env: str) -> tuple[subprocess.CompletedProcess, Path]:
        """``spooled``: run a copy of ``script`` kept elsewhere, as slurmd runs the copy sbatch stored."""
        if spooled:
            _write_exe(tmp_path / "spool" / "slurm_script", script.read_text())
            script = tmp_path / "spool" / "slurm_script"
        job_env = {
            "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "SLURM_JOB_ID": "4242",
            "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_GPUS_ON_NODE": "4",
            "SLURM_CPUS_PER_TASK": "32",
            "SLURM_SUBMIT_DIR": str(tmp_path),  # not the repository: found through the script's own path
            "MLGCN_VENV": str(tmp_path / "venv"),
            "MLGCN_RUNS_DIR": str(tmp_path / "runs"),
            "STUB_LOG": str(log),
            "STUB_HOSTS": "gpu07 gpu08",
            **env,
        }
        # As slurmd starts a batch job: in the submit directory, the script's shell first (its pid is the one
        # SLURM signals as the batch shell, STUB_BATCH_PID for the stubs).
        batch = ["bash", "-c", 'export STUB_BATCH_PID=$$; exec bash "$@"', "batch", str(script), *args]
        done = subprocess.run(batch, env=job_env, cwd=job_env["SLURM_SUBMIT_DIR"] or tmp_path, capture_output=True,
                              text=True, timeout=60)
        return done, log

    return run


def _launch_args(log: Path, node: int) -> list[str]:
    return (log / f"accelerate.{node}").read_text().splitlines()


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_each_node_launches_with_its_own_rank_and_the_first_host_as_rendezvous(fake_job, tmp_path):
    done, log = fake_job("configs/toy.yaml")
    assert done.returncode == 0, done.stderr
    for node in (0, 1):
        args = _launch_args(log, node)
        assert args[:2] == ["launch", "--machine_rank"] and args[2] == str(node)
        assert _flag(args, "--num_machines") == "2"
        assert _flag(args, "--num_processes") == "8"
        assert _flag(args, "--main_process_ip") == "gpu07"
        assert _flag(args, "--main_process_port") == str(20000 + 4242 % 10000)
        assert _flag(args, "--rdzv_backend") == "static"
        assert "--multi_gpu" in args
        # The training config decides both (train.precision, train.compile), not an accelerate config file.
        assert (_flag(args, "--mixed_precision"), _flag(args, "--dynamo_backend")) == ("no", "no")
    srun_flags = (log / "srun.flags").read_text().split()
    # --kill-on-bad-exit=0: a node whose trainers stopped first must not kill the one writing the REQUEUE marker.
    assert {"--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=0"} <= set(srun_flags)


@pytest.mark.parametrize(("job_id", "port_env", "port"), [("4242", {}, "24242"), ("1234567", {}, "24567"),
                                                         ("4242", {"MLGCN_PORT": "29500"}, "29500")])
def test_rendezvous_port_is_20000_plus_the_job_id_modulo_10000_unless_mlgcn_port_is_set(fake_job, job_id, port_env,
                                                                                      port):
    """Job ids grow past 10000: the modulo keeps the port below Linux's ephemeral range (32768+)."""
    done, log = fake_job("configs/toy.yaml", SLURM_JOB_ID=job_id, **port_env)
    assert done.returncode == 0, done.stderr
    assert _flag(_launch_args(log, 1), "--main_process_port") == port


def test_run_dir_wandb_id_and_resume_derive_from_the_job_id(fake_job, tmp_path):
    done, log = fake_job("configs/toy.yaml", "optim.lr=0.05")
    assert done.returncode == 0, done.stderr
    args = _launch_args(log, 0)
    script_args = args[args.index("launch/train.py") + 1:]
    assert script_args == [
        "--config", "configs/toy.yaml",
        f"train.output_dir={tmp_path / 'runs' / 'toy-4242'}", "train.run_name=toy-4242", "log.run_id=toy-4242",
        "train.resume=auto",
        "optim.lr=0.05",  # the user's overrides come last, so they win
    ]


@pytest.mark.parametrize(("restarts", "saved", "last"), [("0", "complete", "train.resume=none"),
                                                        ("1", "complete", "train.resume=auto"),
                                                        ("1", "", "train.resume=none"),
                                                        ("1", "incomplete", "train.resume=none")])
def test_a_requeued_job_resumes_its_own_checkpoints_whatever_the_first_start_was_told(fake_job, tmp_path, restarts,
                                                                                      saved, last):
    """Before its first complete save (train_state.json is written last), a requeued job starts as the first start
    was told."""
    if saved:
        step = tmp_path / "runs" / "toy-4242" / "checkpoints" / "step-00000007"
        step.mkdir(parents=True)
        if saved == "complete":
            (step / "train_state.json").write_text("{}")
    done, log = fake_job("configs/toy.yaml", "train.resume=none", SLURM_RESTART_COUNT=restarts)
    assert done.returncode == 0, done.stderr
    assert _launch_args(log, 0)[-1] == last


def test_launcher_starts_with_sigusr1_and_sigusr2_ignored_so_only_the_trainers_act_on_them(fake_job):
    """SIGUSR1: save and requeue; SIGUSR2: print the trainers' stacks. Either would end the launcher."""
    done, log = fake_job("configs/toy.yaml")
    assert done.returncode == 0, done.stderr
    for node in (0, 1):
        ignored = int((log / f"sigign.{node}").read_text(), 16)
        assert ignored & SIGUSR1_BIT and ignored & SIGUSR2_BIT


def test_requeues_and_exits_zero_when_the_trainer_left_the_requeue_marker(fake_job):
    done, log = fake_job("configs/toy.yaml", STUB_MARKER="1", STUB_EXIT="1")
    assert done.returncode == 0, done.stderr
    assert (log / "requeued").read_text().split() == ["4242"]
    assert "requeueing job 4242" in done.stdout


def test_failure_without_marker_propagates_and_a_stale_marker_is_ignored(fake_job, tmp_path):
    run_dir = tmp_path / "runs" / "toy-4242"
    run_dir.mkdir(parents=True)
    for stale in ("REQUEUE", "REQUEUE.terminated"):
        (run_dir / stale).write_text("from an earlier launch\n")
    done, log = fake_job("configs/toy.yaml", STUB_EXIT="3")
    assert done.returncode == 3
    assert not (log / "requeued").exists()
    assert not list(run_dir.glob("REQUEUE*"))


def test_a_signal_to_the_batch_shell_as_the_step_ends_leaves_the_job_the_steps_exit_status(fake_job):
    """A trap that interrupts `wait` makes it return 128 + the signal's number: the job failed with 138 instead of
    the step's 3 when srun had ended meanwhile."""
    done, log = fake_job("configs/toy.yaml", STUB_USR1_BATCH="1", STUB_EXIT="3")
    assert (log / "scancel").read_text().split() == ["--signal=USR1", "4242"]  # the trap ran
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    assert "training exited with status 3" in done.stdout


def test_signals_to_the_batch_shell_while_the_step_runs_leave_the_script_waiting_for_its_requeue_marker(fake_job):
    """A trapped signal must not end the shell's wait for srun: it acts on the marker once the step has ended."""
    done, log = fake_job("configs/toy.yaml", STUB_USR1_DURING="2", STUB_MARKER="1", STUB_EXIT="1")
    assert (log / "scancel").read_text().splitlines() == ["--signal=USR1 4242"] * 2
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert (log / "requeued").read_text().split() == ["4242"]


def test_signals_to_the_batch_shell_just_as_the_step_ends_never_lose_the_steps_exit_status(fake_job):
    """A trap that interrupts bash's `wait` just as srun ends could make bash lose srun's status for good: `wait`
    returned -1 and the job ended 255 (in about 1 of 3 of these runs), a finished training included."""
    for _ in range(5):
        done, _ = fake_job("configs/toy.yaml", STUB_TERM_BURST="1", STUB_EXIT="3")
        assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)


def test_a_job_slurm_ends_is_not_requeued_and_its_marker_is_renamed_for_a_resubmission_to_resume(fake_job, tmp_path):
    """scancel (or a preemption that cancels) signals the batch shell too: SLURM ends the job, so the script must not
    requeue it, and a REQUEUE left behind read "preempted (requeue pending)" in `mlgcn compare` for good."""
    run_dir = tmp_path / "runs" / "toy-4242"
    done, log = fake_job("configs/toy.yaml", STUB_MARKER="1", STUB_TERM_BATCH="1", STUB_EXIT="1")
    assert done.returncode == 1, done.stderr
    assert not (log / "requeued").exists()
    assert not (run_dir / "REQUEUE").exists() and (run_dir / "REQUEUE.terminated").read_text() == "preempted\n"
    assert "job 4242 terminated by SLURM: not requeued" in done.stdout
    # A new job pointed at the directory resumes there (checkpoints, not markers, tell train.resume=auto).
    done, log = fake_job("configs/toy.yaml", f"train.output_dir={run_dir}", SLURM_JOB_ID="4243")
    assert done.returncode == 0, done.stderr
    assert {"train.resume=auto", f"train.output_dir={run_dir}"} <= set(_launch_args(log, 0))
    assert not list(run_dir.glob("REQUEUE*"))


def test_marker_is_looked_for_in_the_output_dir_the_user_chose(fake_job, tmp_path):
    chosen = tmp_path / "elsewhere"
    done, log = fake_job("configs/toy.yaml", f"train.output_dir={chosen}", STUB_MARKER="1", STUB_EXIT="1")
    assert done.returncode == 0, done.stderr
    assert (chosen / "REQUEUE").exists()
    assert (log / "requeued").exists()


def test_deepspeed_uses_the_standard_multinode_launcher_and_passes_its_config(fake_job):
    done, log = fake_job("configs/toy.yaml", MLGCN_DEEPSPEED="configs/deepspeed/zero2.json")
    assert done.returncode == 0, done.stderr
    args = _launch_args(log, 1)
    assert "--use_deepspeed" in args and "--multi_gpu" not in args
    assert _flag(args, "--deepspeed_multinode_launcher") == "standard"
    assert "train.deepspeed=configs/deepspeed/zero2.json" in args


def test_extra_launch_flags_come_after_the_scripts_own(fake_job):
    done, log = fake_job("configs/toy.yaml", MLGCN_LAUNCH_FLAGS="--num_processes 2 --rdzv_backend c10d")
    assert done.returncode == 0, done.stderr
    args = _launch_args(log, 0)
    launch = args[: args.index("launch/train.py")]
    assert launch[-4:] == ["--num_processes", "2", "--rdzv_backend", "c10d"]  # argparse keeps the last value


@pytest.mark.parametrize("gpus_env", [{"SLURM_GPUS_ON_NODE": ""}, {"SLURM_GPUS_ON_NODE": "0"}])
def test_no_gpu_count_is_an_error_naming_the_variable_to_set(fake_job, gpus_env):
    done, _ = fake_job("configs/toy.yaml", **gpus_env)
    assert done.returncode == 2
    assert "MLGCN_GPUS_PER_NODE" in done.stderr


def test_typed_gpus_per_node_counts_the_gpus(fake_job):
    done, log = fake_job("configs/toy.yaml", SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:2")
    assert done.returncode == 0, done.stderr
    assert _flag(_launch_args(log, 0), "--num_processes") == "4"


def test_mlgcn_gpus_per_node_overrides_the_gpus_slurm_gave_the_node(fake_job):
    done, log = fake_job("configs/toy.yaml", MLGCN_GPUS_PER_NODE="2", SLURM_GPUS_PER_NODE="h100:4")
    assert done.returncode == 0, done.stderr
    assert _flag(_launch_args(log, 0), "--num_processes") == "4"  # 2 nodes x 2, not x SLURM_GPUS_ON_NODE=4


def test_the_launcher_waits_600_s_before_sigkill_unless_the_job_sets_its_own_shutdown_timeout(fake_job):
    """SLURM's KillWait/GraceTime, not torch's 30 s default, bounds the trainers' save on SIGTERM."""
    for env, seen in (({}, "600"), ({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "45"}, "45")):
        done, log = fake_job("configs/toy.yaml", **env)
        assert done.returncode == 0, done.stderr
        assert (log / "shutdown_timeout.1").read_text().strip() == seen


def test_accelerate_comes_from_mlgcn_venv_before_any_on_the_submitting_shells_path(fake_job, tmp_path):
    _write_exe(tmp_path / "bin" / "accelerate", "#!/bin/sh\necho wrong accelerate >&2\nexit 9\n")
    done, log = fake_job("configs/toy.yaml")
    assert done.returncode == 0, done.stderr
    assert _launch_args(log, 0)[0] == "launch"


@pytest.mark.parametrize("where", ["MLGCN_REPO", "SLURM_SUBMIT_DIR"])
def test_a_spooled_copy_of_the_script_finds_the_repository_and_runs_under_its_runs_dir(fake_job, where):
    """sbatch runs a copy of the script kept by slurmd: its own location says nothing about the repository."""
    done, log = fake_job("configs/toy.yaml", spooled=True, MLGCN_RUNS_DIR="", **{where: str(REPO)})
    assert done.returncode == 0, done.stderr
    assert f"train.output_dir={REPO / 'runs' / 'toy-4242'}" in _launch_args(log, 0)


_MODULE_FUNCTION = '() { : "$LMOD_SH_DBG_ON"; printf "%s\\n" "$@" > "$STUB_LOG/module"; }'  # reads an unset variable


def test_mlgcn_modules_are_loaded_one_word_each_by_a_module_function_that_reads_unset_variables(fake_job):
    """Lmod and Environment Modules define `module` as an exported shell function, not set -u clean."""
    module = {"BASH_FUNC_module%%": _MODULE_FUNCTION}
    done, log = fake_job("configs/toy.yaml", MLGCN_MODULES="cuda/12.4 nccl/2.21", **module)
    assert done.returncode == 0, done.stderr
    assert (log / "module").read_text().split("\n") == ["load", "cuda/12.4", "nccl/2.21", ""]


@pytest.mark.parametrize(("args", "env", "named"), [
    ((), {}, "usage: sbatch slurm/coco_gcn.sh CONFIG.yaml"),
    (("configs/toy.yaml",), {"SLURM_JOB_ID": ""}, "SLURM_JOB_ID"),
    (("configs/toy.yaml",), {"STUB_HOSTS": ""}, "SLURM_JOB_NODELIST"),
    (("configs/toy.yaml",), {"MLGCN_VENV": "/nonexistent/venv"}, "MLGCN_VENV"),
    (("configs/toy.yaml",), {"MLGCN_MODULES": "cuda/12.4"}, "MLGCN_MODULES"),
    (("configs/toy.yaml",), {"spooled": True}, "MLGCN_REPO"),  # neither MLGCN_REPO nor the submit dir is the repo
])
def test_a_job_that_cannot_start_exits_2_with_an_error_naming_what_to_set(fake_job, args, env, named):
    done, log = fake_job(*args, **env)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "[slurm] error:" in done.stderr and named in done.stderr
    assert not (log / "accelerate.0").exists()


def test_single_node_script_runs_the_same_job_on_one_node(fake_job):
    done, log = fake_job("configs/toy.yaml", script=SINGLE_NODE_SCRIPT, SLURM_NNODES="1", SLURM_JOB_NODELIST="gpu07",
                         STUB_HOSTS="gpu07", SLURM_SUBMIT_DIR=str(REPO))
    assert done.returncode == 0, done.stderr
    args = _launch_args(log, 0)
    assert (_flag(args, "--num_machines"), _flag(args, "--num_processes")) == ("1", "4")
    assert not (log / "accelerate.1").exists()


@pytest.mark.parametrize("repo", [str(REPO), ""], ids=["MLGCN_REPO", "no-MLGCN_REPO"])
def test_single_node_script_finds_coco_gcn_through_mlgcn_repo_or_names_it(fake_job, repo):
    """A spooled copy, submitted from outside the repository: MLGCN_REPO says where coco_gcn.sh is."""
    done, log = fake_job("configs/toy.yaml", script=SINGLE_NODE_SCRIPT, spooled=True, MLGCN_REPO=repo,
                         SLURM_NNODES="1", SLURM_JOB_NODELIST="gpu07", STUB_HOSTS="gpu07")
    if repo:
        assert done.returncode == 0, done.stderr
        assert _flag(_launch_args(log, 0), "--num_machines") == "1"
    else:
        assert done.returncode == 2 and "MLGCN_REPO" in done.stderr, done.stderr


def test_single_node_script_leaves_signals_to_the_batch_shell_to_coco_gcns_traps(fake_job, tmp_path):
    """SLURM signals the job's first process: single_node.sh must become coco_gcn.sh (exec), not wait for it."""
    one_node = {"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu07", "STUB_HOSTS": "gpu07"}
    done, log = fake_job("configs/toy.yaml", script=SINGLE_NODE_SCRIPT, STUB_USR1_BATCH="1", STUB_EXIT="3",
                         MLGCN_REPO=str(REPO), **one_node)
    assert (log / "scancel").read_text().split() == ["--signal=USR1", "4242"]
    assert done.returncode == 3, (done.returncode, done.stderr)
    done, log = fake_job("configs/toy.yaml", script=SINGLE_NODE_SCRIPT, STUB_MARKER="1", STUB_TERM_BATCH="1",
                         STUB_EXIT="1", MLGCN_REPO=str(REPO), **one_node)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert (tmp_path / "runs" / "toy-4242" / "REQUEUE.terminated").exists()


def _sbatch_options(script: Path) -> dict[str, str]:
    lines = [line.split("#", 2)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]
    return dict(line.removeprefix("SBATCH ").strip().partition("=")[::2] for line in lines)  # --requeue: ""


@pytest.mark.parametrize("script", [SCRIPT, SINGLE_NODE_SCRIPT])
def test_both_scripts_ask_for_a_requeueable_job_with_usr1_to_its_step_and_one_appended_log(script):
    """sbatch reads #SBATCH lines only from the file it is given: single_node.sh repeats coco_gcn.sh's."""
    options = _sbatch_options(script)
    assert options["--signal"] == "USR1@180"  # not B:USR1, which only the batch shell gets
    assert options["--requeue"] == ""
    assert (options["--open-mode"], options["--output"]) == ("append", "logs/%x-%j.out")
    assert options["--ntasks-per-node"] == "1"  # one launcher per node


def test_missing_config_file_is_an_error_naming_it(fake_job):
    done, _ = fake_job("configs/nope.yaml")
    assert done.returncode == 2
    assert "configs/nope.yaml" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# A real SLURM on localhost: the script as users submit it, training the toy set on two CPU processes.

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as err:
        pytest.skip(f"no local SLURM: {err}")
    yield cluster
    cluster.stop()


class ToyJobs:
    """Submits the sbatch scripts with configs/toy.yaml from ``workdir`` and knows where each job's files land."""

    def __init__(self, slurm: SlurmCluster, workdir: Path, toy_root: Path):
        self.slurm = slurm
        self.workdir = workdir
        self.toy_root = toy_root
        self.submitted: list[int] = []
        (workdir / "logs").mkdir()

    def submit(self, *overrides: str, script: Path = SCRIPT) -> int:
        env = {
            "MLGCN_REPO": str(REPO),
            "MLGCN_VENV": sys.prefix,  # the environment running these tests
            "MLGCN_RUNS_DIR": str(self.workdir / "runs"),
            "MLGCN_GPUS_PER_NODE": "2",  # two CPU processes: the trainer forms a gloo group without GPUs
            "WANDB_MODE": "disabled",
        }
        # One node; --gpus-per-node=0 replaces the script's 8 GPUs (SLURM 22.05 accepts it without any GRES).
        flags = ["--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={min(self.slurm.cpus, 2)}", "--time=10"]
        args = ["configs/toy.yaml", f"data.root={self.toy_root}", "data.workers=0", *overrides]
        job = self.slurm.submit(script, args, flags, env, cwd=self.workdir)
        self.submitted.append(job)
        return job

    def log(self, job: int) -> str:
        path = self.workdir / "logs" / f"mlgcn-{job}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def run_dir(self, job: int) -> Path:
        return self.workdir / "runs" / f"toy-{job}"

    def newest_checkpoint(self, job: int) -> str:
        complete = sorted(p.parent.name for p in (self.run_dir(job) / "checkpoints").glob("step-*/train_state.json"))
        return complete[-1] if complete else ""

    def evaluations(self, job: int) -> int:
        metrics = self.run_dir(job) / "metrics.jsonl"
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0


@pytest.fixture
def toy_jobs(slurm: SlurmCluster, tmp_path: Path, toy_root: Path) -> Iterator[ToyJobs]:
    jobs = ToyJobs(slurm, tmp_path, toy_root)
    yield jobs
    for job in jobs.submitted:
        slurm.cancel(job)
    for job in jobs.submitted:
        wait_until(lambda job=job: slurm.job(job).get("JobState", "forgotten") in ENDED | {"forgotten"}, 60,
                   f"job {job} to end")


@pytest.mark.slow
def test_single_node_job_trains_to_the_end_with_checkpoint_and_summary(slurm, toy_jobs):
    job = toy_jobs.submit("train.epochs=1", script=SINGLE_NODE_SCRIPT)
    info = slurm.wait_job(job, ENDED, timeout=150)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), toy_jobs.log(job)[-4000:]
    run_dir = toy_jobs.run_dir(job)
    assert list((run_dir / "checkpoints").glob("step-*/train_state.json"))
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert "best_mAP" in json.loads((run_dir / "summary.json").read_text())
    assert toy_jobs.evaluations(job) == 1
    assert not (run_dir / "REQUEUE").exists()
    assert "training exited with status 0" in toy_jobs.log(job)


def _wait_for_training(toy_jobs: ToyJobs, job: int) -> None:
    """A new evaluation proves the trainers are in their training loop, with their signal handler installed."""
    evaluated = toy_jobs.evaluations(job)
    wait_until(lambda: toy_jobs.evaluations(job) > evaluated, 120, f"job {job} to train",
               lambda: toy_jobs.log(job)[-3000:])


def _preempt_and_resume(slurm: SlurmCluster, toy_jobs: ToyJobs, job: int, scancel_flags: list[str],
                        restarts: int) -> None:
    """Signal USR1 once training runs, check save + requeue, then start the requeued job and check its resume."""
    _wait_for_training(toy_jobs, job)
    before = toy_jobs.newest_checkpoint(job)
    slurm.run("scancel", *scancel_flags, "--signal=USR1", str(job))
    # Pending again, not just counted as restarted: a start time set while the job still completes is overwritten.
    wait_until(lambda: (slurm.job(job).get("Restarts"), slurm.job(job).get("JobState")) == (str(restarts), "PENDING"),
               90, f"job {job} to requeue itself", lambda: f"{slurm.job(job)}\n{toy_jobs.log(job)[-3000:]}")
    assert toy_jobs.log(job).count(f"requeueing job {job}") == restarts
    saved = toy_jobs.newest_checkpoint(job)
    assert saved > before, "no checkpoint saved on SIGUSR1"
    # No `scontrol update StartTime=now`: SLURM holds a requeued job until the old job credential expires
    # (AuthInfo cred_expire, 5 s in the test cluster, 120 s by default); starting it sooner on the same node
    # fails with "Job credential revoked".
    wait_until(lambda: toy_jobs.log(job).count("resumed from") == restarts, 120, f"job {job} to resume",
               lambda: f"{slurm.job(job)}\n{slurm.run('sinfo', '-N', '-l', check=False).stdout}\n"
                       f"{toy_jobs.log(job)[-3000:]}")
    resumed = toy_jobs.log(job).rsplit("resumed from", 1)[1].splitlines()[0]
    assert f"/{saved}" in resumed


@pytest.mark.slow
def test_sigusr1_saves_requeues_and_resumes_until_scancel_ends_the_job(slurm, toy_jobs):
    job = toy_jobs.submit("train.epochs=1000", "train.log_every=1")
    # What --signal=USR1@T does before the time limit: USR1 to every process of the job step.
    _preempt_and_resume(slurm, toy_jobs, job, [], restarts=1)
    # What --signal=B:USR1@T does: USR1 to the batch shell only, which passes it on to the trainers.
    _preempt_and_resume(slurm, toy_jobs, job, ["--batch"], restarts=2)
    # A plain scancel (SIGTERM everywhere) ends the job for good, although the trainers save and ask for a requeue.
    _wait_for_training(toy_jobs, job)
    slurm.cancel(job)
    info = slurm.wait_job(job, ENDED, timeout=60)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "2"), toy_jobs.log(job)[-3000:]
    # The trainers' ask to be requeued, renamed: SLURM ended the job, and `mlgcn compare` says so.
    assert not (toy_jobs.run_dir(job) / "REQUEUE").exists()
    assert (toy_jobs.run_dir(job) / "REQUEUE.terminated").exists()
    (run,) = collect_local_runs([toy_jobs.run_dir(job)])
    assert run_status(run) == "preempted (job ended)"
    assert toy_jobs.log(job).count(f"requeueing job {job}") == 2
    assert "training exited with status" in toy_jobs.log(job).rsplit("resumed from", 1)[1]
