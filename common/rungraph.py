"""A sweep's runs ({kind, out, cmd}) executed in dependency order: a run starts once the runs that write its
inputs have finished, and a run whose own result exists is skipped, so an interrupted sweep resumes with any
executor. A finished checkpoint counts as this run's result only if its sidecar's argv is this run's flags."""
from __future__ import annotations

import concurrent
import os
import time
from pathlib import Path
from typing import Callable


from .errors import UserError
from .outputs import finished, sidecar_path
from .checkpoints import read_sidecar
from .executors import (Executor, _run_process, _script_error, _slot_envs, _submitit_executor, compile_cache_env,
                        forks_warm, job_gpus, script_argv, start_warm_interpreter)


def stale_reason(run: dict) -> str | None:
    """Why a finished checkpoint at run["out"] is not this run's: made by other flags (its sidecar's argv), or
    unreadable. None when it is this run's own result (or predates the argv record)."""
    try:
        argv = read_sidecar(run["out"]).get("argv")
    except UserError as err:
        return str(err)
    if argv is None:
        return None  # made before sidecars recorded argv: trusted, as its path encodes the profile's flags
    planned = [str(a) for a in run["cmd"][1:]]
    kept = [a for i, a in enumerate(argv) if a not in PLUMBING_FLAGS + PLUMBING_OPTIONS
            and (i == 0 or argv[i - 1] not in PLUMBING_OPTIONS)]
    return None if kept == planned else f"made with other flags ({' '.join(kept)})"


PLUMBING_OPTIONS = ("--out", "--data-dir", "--device")  # flags (and their values) that do not change a result


PLUMBING_FLAGS = ("--overwrite",)


def inputs_of(run: dict) -> list[Path]:
    """The files a run reads: the Paths in its command (checkpoints that other runs of the sweep may write)."""
    return [arg for arg in run["cmd"] if isinstance(arg, Path)]


def redo_reason(run: dict, overwrite: bool) -> str | None:
    """None when the run's own result exists; else why it runs: "" the first time, " (redone: ...)" when a
    checkpoint there was made with other flags or is unreadable. An evaluation's JSON is its own result while it
    is newer than every checkpoint it read (its file name carries a digest of its command)."""
    out = run["out"]
    if overwrite:
        return ""
    if run["kind"] == "evaluation":
        inputs = [p for path in inputs_of(run) for p in (path, sidecar_path(path))]
        fresh = out.is_file() and all(p.exists() and p.stat().st_mtime <= out.stat().st_mtime for p in inputs)
        return None if fresh else ""
    if not finished(out):
        return ""
    reason = stale_reason(run)
    return None if reason is None else f" (redone: {reason})"


def run_graph(runs: list[dict], executor: Executor, *, data_dir: str, device: str, log_dir: Path,
              overwrite: bool = False, may_fail: Callable[[dict], bool] = lambda run: False) -> set[Path]:
    """Execute the runs, each once the runs that write its inputs have finished; a run whose own result exists is
    skipped (redo_reason), so an interrupted sweep resumes with any executor. A failed run's dependants do not
    start; everything else still runs. Returns the outputs of the failed runs for which may_fail(run) holds (tuning
    candidates: dropped); any other failure raises once nothing more can run, naming the logs. The sweep's folder
    (log_dir's parent) holds the runs' shared torch.compile cache (compile_cache_env)."""
    by_out = {run["out"]: run for run in runs}
    runs = list(by_out.values())
    needs = {run["out"]: [p for p in inputs_of(run) if p in by_out] for run in runs}
    done, failed, errors, pending = set(), set(), [], []
    start, counter = time.perf_counter(), iter(range(1, len(runs) + 1))

    def report(run, status):
        print(f"[{next(counter)}/{len(runs)}] {run['out'].name}: {status} "
              f"({time.perf_counter() - start:.0f}s total)", flush=True)

    for run in runs:
        reason = redo_reason(run, overwrite)
        if reason is None:
            done.add(run["out"])
            report(run, "skipped (exists)")
        else:
            pending.append((run, reason))
    in_process_tree = executor.kind in ("serial", "local")  # else submitit jobs
    if in_process_tree:
        capacity, warm = executor.workers, forks_warm(device)
        envs = _slot_envs(executor, device, sweep_dir=log_dir.parent)
        pool = concurrent.futures.ThreadPoolExecutor(capacity)
    else:
        capacity, clusters = executor.parallelism, {}
    free_slots, running = list(range(capacity)), {}

    def submit(run: dict, slot: int):
        """Start one run in a free slot: a thread's future, or a submitted job."""
        run["out"].parent.mkdir(parents=True, exist_ok=True)
        argv = script_argv(run, executor, data_dir=data_dir, device=device, log_dir=log_dir)
        if in_process_tree:
            return pool.submit(_run_process, argv, envs[slot], log_dir / f"{run['out'].name}.log", warm=warm)
        gpus = job_gpus(run, executor)
        if gpus not in clusters:
            clusters[gpus] = _submitit_executor(executor, log_dir / "submitit", gpus)
        import submitit
        # The threads are set in the job: the login node's environment stays there.
        cache = [f"{k}={v}" for k, v in compile_cache_env(log_dir.parent).items()]
        return clusters[gpus].submit(submitit.helpers.CommandFunction(
            ["env", f"OMP_NUM_THREADS={executor.job_cpus}", *cache, *argv], cwd=os.getcwd(), verbose=True))

    def finish(run: dict, reason: str, handle, began: float) -> None:
        """A run whose handle is done: done, or failed (the sweep goes on without it and its dependants)."""
        try:
            handle.result()
        except Exception as err:  # a script's failure, reported with its log
            failed.add(run["out"])
            message = str(err) if in_process_tree else f"{_script_error(str(err))} (log: {handle.paths.stderr})"
            if not may_fail(run):
                errors.append(f"{run['out'].name}: {message}")
            report(run, f"FAILED: {message}")
            return
        done.add(run["out"])
        report(run, f"done in {time.perf_counter() - began:.0f}s{reason}")

    try:
        if in_process_tree and warm and pending:
            start_warm_interpreter()
        while pending or running:
            for run, reason in list(pending):
                if any(p in failed for p in needs[run["out"]]):
                    pending.remove((run, reason))
                    failed.add(run["out"])
                    report(run, "not run (an input failed)")
                elif free_slots and all(p in done for p in needs[run["out"]]):
                    pending.remove((run, reason))
                    slot = free_slots.pop(0)
                    running[run["out"]] = (run, reason, slot, submit(run, slot), time.perf_counter())
            if not running:
                continue
            time.sleep(0.2 if in_process_tree else 2.0)
            for out, (run, reason, slot, handle, began) in list(running.items()):
                if handle.done():
                    del running[out]
                    free_slots.append(slot)
                    finish(run, reason, handle, began)
    except KeyboardInterrupt:
        # Ctrl-C reaches this process's own children, not jobs on a cluster: those would run on, unwatched.
        jobs = [] if in_process_tree else [handle for *_, handle, _ in running.values()]
        for handle in jobs:
            handle.cancel(check=False)
        stopped = f"interrupted: {len(running)} run(s) stopped"
        if jobs:
            stopped += f", {len(jobs)} submitted job(s) cancelled"
        raise UserError(f"{stopped}; finished runs are kept, the same command again resumes") from None
    if in_process_tree:
        pool.shutdown()
    if errors:
        raise UserError(f"{len(errors)} run(s) failed, first {errors[0]}; the finished runs are kept: "
                               "run the same command again to redo the others")
    return {out for out in failed if may_fail(by_out[out])}
