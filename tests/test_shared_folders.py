"""Safe on a shared folder: outputs are claimed by kernel-held locks, not by pids (a pid means nothing on another
node), a killed run's lock is taken over, first runs on a fresh data folder never see half-unpacked files, reports
and sweeps are claimed like checkpoints, and a save that runs out of room leaves nothing behind. Every case runs
through the real command line."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common
from conftest import ROOT, as_foreground_job

TINY_PRETRAIN = ["--dataset", "fashion-mnist", "--arch", "resnet_tiny", "--train-subset", "300", "--epochs", "1"]


def _popen(script, *args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _run(script, *args, **kwargs) -> subprocess.CompletedProcess:
    proc = _popen(script, *args, **kwargs)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


def _wait_for_lock(lock: Path, pid: int, timeout: float = 120) -> None:
    """Until the process has claimed its output (its lock file names it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and f"pid {pid} " in lock.read_text():
            return
        time.sleep(0.1)
    pytest.fail(f"{lock} never named pid {pid}")


def _locks(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.lock"))


@pytest.mark.slow
def test_a_live_run_keeps_its_output_and_a_killed_runs_lock_is_taken_over(data_dir, tmp_path):
    out = tmp_path / "original.safetensors"
    lock = common.lock_path(out)
    # A run long enough to be alive while the second one starts.
    first = _popen("pretrain.py", "--dataset", "fashion-mnist", "--arch", "resnet_tiny", "--train-subset", "2000",
                   "--epochs", "200", "--data-dir", data_dir, "--out", out)
    try:
        _wait_for_lock(lock, first.pid)
        refused = _run("pretrain.py", *TINY_PRETRAIN, "--data-dir", data_dir, "--out", out)
        message = _one_error_line(refused)
        assert "being written by another run" in message and f"pid {first.pid} on host {socket.gethostname()}" \
            in message, message
    finally:
        first.kill()
        first.wait()
    assert lock.exists() and not out.exists()  # SIGKILL leaves the file; the kernel released its lock
    again = _run("pretrain.py", *TINY_PRETRAIN, "--data-dir", data_dir, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    common.load_checkpoint(out)
    assert _locks(tmp_path) == []


@pytest.mark.slow
def test_a_lock_naming_another_host_and_a_live_pid_is_judged_by_the_kernel(data_dir, tmp_path):
    """pid 1 is alive here, and a pid says nothing about another host: only the kernel's lock counts."""
    out = tmp_path / "original.safetensors"
    common.lock_path(out).write_text("pid 1 on host node-elsewhere\n")
    proc = _run("pretrain.py", *TINY_PRETRAIN, "--data-dir", data_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert common.finished(out) and _locks(tmp_path) == []


@pytest.mark.slow
def test_four_first_runs_on_one_empty_data_folder_all_succeed(tmp_path):
    data = tmp_path / "fresh_data"
    runs = [_popen("pretrain.py", *TINY_PRETRAIN, "--seed", seed, "--data-dir", data,
                   "--out", tmp_path / f"o{seed}.safetensors") for seed in range(4)]
    results = [(run.wait(timeout=600), run.stderr.read()[-1000:]) for run in runs]
    assert [rc for rc, _ in results] == [0] * 4, results
    assert _locks(tmp_path) == []


@pytest.mark.slow
def test_a_report_being_written_is_refused_to_a_second_evaluate(original, retrain, data_dir, tmp_path):
    report = tmp_path / "rows.json"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, common; common.claim_file(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", str(report)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = _run("evaluate.py", original, "--retrain", retrain, "--mia-draws", "1", "--data-dir", data_dir,
                       "--json", report)
        message = _one_error_line(refused)
        assert "being written by another run" in message and f"pid {holder.pid} " in message, message
    finally:
        holder.kill()
        holder.wait()
    proc = _run("evaluate.py", original, "--retrain", retrain, "--mia-draws", "1", "--data-dir", data_dir,
                "--json", report)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(report.read_text())["rows"] and _locks(tmp_path) == []


@pytest.mark.slow
def test_a_second_sweep_of_one_profile_refuses_at_once(tmp_path, data_dir):
    args = ["--profile", "smoke", "--out-root", tmp_path / "results", "--data-dir", data_dir]
    first = _popen("reproduce.py", *args, start_new_session=True, preexec_fn=as_foreground_job)
    try:
        _wait_for_lock(tmp_path / "results" / "smoke" / ".sweep.lock", first.pid)
        message = _one_error_line(_run("reproduce.py", *args))
        assert "being written by another run" in message and f"pid {first.pid} " in message, message
    finally:
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the sweep and the run it started stop and let go of their locks
        first.wait(timeout=120)


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    return apply


@pytest.mark.slow
def test_a_save_that_runs_out_of_room_leaves_nothing_and_says_so(original, data_dir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _run("finetune.py", "--model", original, "--forget-class", "3", "--epochs", "1", "--data-dir", data_dir,
                "--out", out_dir / "ft.safetensors", preexec_fn=_file_size_limit(100_000))
    message = _one_error_line(proc)
    assert "cannot write" in message and "File too large" in message, message
    assert list(out_dir.iterdir()) == []  # no weights, sidecar, temporary file or lock
