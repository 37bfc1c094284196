"""launch/with_mps.sh: a command under an MPS daemon of its own, quit however the command ends.

No GPU here: a stand-in for nvidia-cuda-mps-control records how it was called and writes a control log as the
real daemon does ("New client ... connected" per client)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "with_mps.sh"

STAND_IN = """#!/usr/bin/env bash
# -d: the daemon starts (its pipe appears, two clients connect); stdin "quit": it stops (its pipe goes).
calls="$(dirname "$0")/calls"
if [[ "${1:-}" == -d ]]; then
    echo "start pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> "$calls"
    [[ -n "${REFUSE:-}" ]] && { echo "cannot start: permission denied" > "$CUDA_MPS_LOG_DIRECTORY/control.log"; exit 1; }
    touch "$CUDA_MPS_PIPE_DIRECTORY/control"
    echo "[2026-11-28 17:00:00.000 Control 1] New client 42 connected" >> "$CUDA_MPS_LOG_DIRECTORY/control.log"
    echo "[2026-11-28 17:00:00.100 Control 1] New client 43 connected" >> "$CUDA_MPS_LOG_DIRECTORY/control.log"
    exit 0
fi
read -r command
if [[ "$command" == get_server_list ]]; then  # answered while the daemon runs, as the real one does
    if [[ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]]; then echo "poll: running" >> "$calls"; exit 0; fi
    echo "poll: gone" >> "$calls"
    exit 1
fi
echo "$command" >> "$calls"
if [[ -n "${SLOW_QUIT:-}" ]]; then  # a daemon that takes a while to wind its servers down
    (sleep 0.6; rm -f "$CUDA_MPS_PIPE_DIRECTORY/control") > /dev/null 2>&1 &
else
    rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
fi
"""


@pytest.fixture
def control(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "nvidia-cuda-mps-control"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    return stand_in


def _env(tmp_path: Path, control: Path | None, **extra: str) -> dict:
    path = os.environ["PATH"] if control is None else f"{control.parent}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "TMPDIR": str(tmp_path), **extra}


def _calls(control: Path) -> list[str]:
    return (control.parent / "calls").read_text().splitlines()


def test_the_command_runs_as_a_client_of_a_daemon_in_a_directory_of_its_own_which_is_quit_and_removed_after(
    tmp_path, control
):
    seen = tmp_path / "seen"
    run = subprocess.run(["bash", str(SCRIPT), "bash", "-c", f'echo "$CUDA_MPS_PIPE_DIRECTORY" > {seen}; exit 7'],
                         env=_env(tmp_path, control), capture_output=True, text=True, timeout=60)
    assert run.returncode == 7  # the command's status
    start, quit_, poll = _calls(control)
    pipe = seen.read_text().strip()
    assert start == f"start pipe={pipe} log={Path(pipe).parent / 'log'}" and (quit_, poll) == ("quit", "poll: gone")
    assert Path(pipe).parent.parent == tmp_path and not Path(pipe).parent.exists()  # private, then removed
    assert "the MPS daemon saw 2 client connection(s) and was quit" in run.stderr


def test_the_daemon_is_waited_for_until_it_no_longer_answers_before_its_directory_is_removed(tmp_path, control):
    run = subprocess.run(["bash", str(SCRIPT), "true"], env=_env(tmp_path, control, SLOW_QUIT="1"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    calls = _calls(control)
    assert calls[1] == "quit" and "poll: running" in calls[2:] and calls[-1] == "poll: gone"
    assert list(tmp_path.glob("mlgcn-mps.*")) == []


def test_without_mps_installed_the_command_does_not_run_and_the_status_says_mps_could_not_start(tmp_path):
    ran = tmp_path / "ran"
    run = subprocess.run(["bash", str(SCRIPT), "touch", str(ran)],
                         env=_env(tmp_path, None, MPS_CONTROL="no-such-mps-control"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3 and not ran.exists()
    assert "no-such-mps-control not found" in run.stderr


def test_a_daemon_that_refuses_to_start_is_reported_with_its_log_and_the_command_does_not_run(tmp_path, control):
    ran = tmp_path / "ran"
    run = subprocess.run(["bash", str(SCRIPT), "touch", str(ran)], env=_env(tmp_path, control, REFUSE="1"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 3 and not ran.exists()
    assert "-d failed" in run.stderr and "permission denied" in run.stderr
    assert list(tmp_path.glob("mlgcn-mps.*")) == []


@pytest.mark.parametrize("how", ["timeout", "interrupt"])
def test_a_command_stopped_from_outside_still_has_its_daemon_quit(tmp_path, control, how):
    """gpu_check.sh runs every step under `timeout`, which sends TERM to the whole process group."""
    if how == "timeout":
        run = subprocess.run(["timeout", "2", "bash", str(SCRIPT), "sleep", "30"], env=_env(tmp_path, control),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 124
    else:
        # As from a terminal's Ctrl-C: a test run in the background inherits SIGINT ignored, which bash cannot trap.
        proc = subprocess.Popen(["bash", str(SCRIPT), "sleep", "30"], env=_env(tmp_path, control),
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 20
        while not (control.parent / "calls").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    assert _calls(control)[-2:] == ["quit", "poll: gone"]
    assert list(tmp_path.glob("mlgcn-mps.*")) == []
