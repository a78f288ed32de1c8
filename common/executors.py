"""Where a sweep's runs execute (Executor): one after another, on local workers pinned to GPUs or CPU threads,
or as SLURM jobs through submitit; data-parallel training runs under torchrun. Every executor runs the same
command lines, so a sweep's results do not depend on it (given the same CPU threads per run)."""
from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .cli import non_negative_int, positive_int


@dataclass
class Executor:
    """Where a sweep's runs execute. serial: one after another in this process tree. local: `workers` at a time on
    this machine, each pinned to its own GPU (round robin over the visible ones) or to `threads` CPU threads.
    slurm: one submitit job per run (partition, time, GPUs, CPUs, at most `parallelism` in flight); submitit-local:
    the same jobs as local processes (slurm's code path without a cluster). Every executor runs the same commands,
    so a sweep's results do not depend on it, given the same CPU threads per run (a different thread count
    changes the order of float reductions, and with it the trained weights' last digits and what follows).
    ddp > 1 runs pretrain.py and prune.py data-parallel under torchrun on that many GPUs (a slurm job asks for
    them; a local worker owns that many): faster Retrains, but per-GPU BatchNorm statistics change the results."""
    kind: str = "serial"
    workers: int = 1
    threads: int | None = None  # CPU threads per run (OMP_NUM_THREADS); None: the scripts' default (all cores)
    partition: str | None = None
    time_min: int = 600
    gpus: int = 1
    cpus: int = 8
    parallelism: int = 64
    ddp: int = 1  # processes (GPUs) of each run that trains a network from scratch, under torchrun

    @property
    def job_cpus(self) -> int:
        """CPUs (and OMP threads) of one SLURM or submitit job."""
        return self.threads or self.cpus


EXECUTORS = ("serial", "local", "slurm", "submitit-local")


def make_executor(kind: str, *, workers: int | None = None, threads: int | None = None, ddp: int = 1,
                  **slurm) -> Executor:
    """An Executor with its defaults resolved: local workers = the GPU count / ddp (1 without CUDA), and each
    run's share of the CPU threads."""
    if kind not in EXECUTORS:
        raise UserError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if kind != "local":
        if workers:
            raise UserError(f"--workers is for --executor local (slurm: --slurm-parallelism), not {kind}")
        return Executor(kind, 1, threads, ddp=ddp, **slurm)
    workers = workers or max(torch.cuda.device_count() // ddp, 1)
    return Executor(kind, workers, threads or max(len(os.sched_getaffinity(0)) // workers, 1), ddp=ddp, **slurm)


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """The flags of make_executor (reproduce.py, and audit.py lira for its shadow population)."""
    g = parser.add_argument_group("executor (where the runs go; the results do not depend on it, given the same "
                                  "--threads-per-run)")
    g.add_argument("--executor", choices=EXECUTORS, default="serial",
                   help="serial: one run at a time; local: --workers at once on this machine; slurm: jobs through "
                        "submitit; submitit-local: those jobs as local processes (default: %(default)s)")
    g.add_argument("--workers", type=positive_int, default=None,
                   help="local: concurrent runs, each on its own GPU (round robin over the visible ones) or its "
                        "share of the CPU (default: the GPU count / --ddp, or 1 without CUDA)")
    g.add_argument("--threads-per-run", type=positive_int, default=None,
                   help="CPU threads of each run (default: serial all, local cores/workers, slurm --slurm-cpus)")
    g.add_argument("--ddp", type=positive_int, default=1,
                   help="processes (GPUs) per training-from-scratch run (pretrain.py, prune.py) under torchrun; "
                        "changes the results (per-GPU BatchNorm statistics) (default: %(default)s)")
    g.add_argument("--slurm-partition", default=None, help="(default: the cluster's)")
    g.add_argument("--slurm-time", type=positive_int, default=600, help="minutes per job (default: %(default)s)")
    g.add_argument("--slurm-gpus", type=non_negative_int, default=1,
                   help="GPUs per job; a --ddp run's job asks for --ddp (default: %(default)s)")
    g.add_argument("--slurm-cpus", type=positive_int, default=8, help="CPUs per job (default: %(default)s)")
    g.add_argument("--slurm-parallelism", type=positive_int, default=64,
                   help="jobs in flight at most (default: %(default)s)")


def executor_from_args(args: argparse.Namespace) -> Executor:
    """make_executor with the values of add_executor_args' flags."""
    return make_executor(args.executor, workers=args.workers, threads=args.threads_per_run,
                         partition=args.slurm_partition, time_min=args.slurm_time, gpus=args.slurm_gpus,
                         cpus=args.slurm_cpus, parallelism=args.slurm_parallelism, ddp=args.ddp)


DATA_PARALLEL_SCRIPTS = ("pretrain.py", "prune.py")  # whole training runs: torchrun-aware


def _processes(run: dict, executor: Executor) -> int:
    return executor.ddp if run["cmd"][0] in DATA_PARALLEL_SCRIPTS else 1


def job_gpus(run: dict, executor: Executor) -> int:
    """The GPUs a SLURM job of this run asks for: one per torchrun process, else --slurm-gpus."""
    processes = _processes(run, executor)
    return processes if processes > 1 else executor.gpus


def script_argv(run: dict, executor: Executor, *, data_dir: str, device: str,
                log_dir: Path | None = None) -> list[str]:
    """The command line of one run as the executor starts it; torchrun keeps its per-run folders (its workers'
    error files) in log_dir/torchrun, where given (else torch makes one in the system's temporary folder and
    leaves it there)."""
    script, *args = map(str, run["cmd"])
    if not Path(script).exists():
        raise UserError(f"script {script} does not exist in this checkout")
    processes = _processes(run, executor)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                     *(["--log-dir", str(log_dir / "torchrun")] if log_dir else [])]
    output_flag = "--json" if run["kind"] == "evaluation" else "--out"
    return [*launcher, script, *args, "--data-dir", data_dir, "--device", device, output_flag, str(run["out"]),
            "--overwrite"]


def command_line(run: dict, executor: Executor, *, data_dir: str, device: str) -> str:
    """script_argv as a user would type it (for --dry-run)."""
    return " ".join(["python", *script_argv(run, executor, data_dir=data_dir, device=device)[1:]])


# A CPU run of the serial and local executors starts as a fork of a warm interpreter, forkserver's, that imported
# this package once: a fresh interpreter spends 5-7 s of a 2-core machine importing torch, torchvision and timm
# again, more than many small runs train. The fork is still a process of its own (pid, exit status, log, peak RSS
# from the fork on, which the server's imports alone make up, as a fresh run's would). Not on CUDA: a fork must
# not inherit an initialised CUDA runtime, and a GPU run's imports are small beside its work. torchrun and SLURM
# jobs start fresh interpreters.
WARM_IMPORTS = ("common",)


def _warm_context():
    """multiprocessing's forkserver context, its server preloading WARM_IMPORTS."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WARM_IMPORTS))
    return context


def start_warm_interpreter() -> None:
    """Start the warm interpreter and wait until its imports are done (from the main thread, before the first run).
    It starts with SIGINT blocked and keeps it blocked: a Ctrl-C in those seconds interrupts only this wait, which
    the sweep reports in its one line, instead of also printing the server's KeyboardInterrupt traceback. A blocked
    signal is only deferred: one that arrives while this process blocks it is raised here once unblocked. The
    runs, forked afterwards, unblock it (_script_in_fork) and stop at a Ctrl-C as before."""
    context = _warm_context()
    multiprocessing.resource_tracker.ensure_running()  # first: the server starts it otherwise, and that unblocks SIGINT
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # a new process inherits the mask
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    ready = context.Process(target=_ready)  # start() returns once the server has forked it: after its imports
    ready.start()
    ready.join()


def _ready() -> None:
    """The warm interpreter's first fork, which does nothing (start_warm_interpreter)."""


def forks_warm(device: str) -> bool:
    """Whether the sweep's runs on this device start as forks of the warm interpreter (CPU runs only)."""
    return device == "cpu" or not torch.cuda.is_available()


def _script_in_fork(script: str, args: list[str], env: dict, log: str) -> None:
    """What `python script args` does in a fresh interpreter with env and output to log, in a fork of the warm
    one: environment, output, threads (torch read OMP_NUM_THREADS when the server started), argv, path, and
    SIGINT unblocked (start_warm_interpreter; the server gives a fork the sweep's action for it)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    path = os.path.abspath(script)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(path)
    runpy.run_path(path, run_name="__main__")


def _run_process(argv: list[str], env: dict, log: Path, *, warm: bool = False) -> None:
    """One run as a subprocess of this one (warm: a fork of the warm interpreter where argv is `python script
    ...`), its output in log; a failure raises its last line of stderr."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if warm and argv[0] == sys.executable and argv[1].endswith(".py"):
        fork = _warm_context().Process(target=_script_in_fork, args=(argv[1], argv[2:], env, str(log)))
        fork.start()
        fork.join()
        returncode = fork.exitcode
    else:
        with open(log, "w") as f:
            returncode = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, text=True).returncode
    if returncode:
        raise UserError(f"{_script_error(log.read_text())} (log: {log})")


def _script_error(text: str) -> str:
    """The one-line reason a run failed, out of its whole log: the script's own `error: ...` line; else the
    exception that ended a crashed process (under torchrun, a worker's, not the launcher's ChildFailedError
    report); else the exit code torchrun reports for a worker killed without one; else the last line."""
    lines = [line.strip() for line in text.splitlines() if re.search(r"\w", line)] or ["?"]
    # from the last "error: " of a line: under torchrun every process may print the same error into one line
    errors = [line[line.rindex("error: "):] for line in lines if "error: " in line]
    exceptions = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", line)
                  and "ChildFailedError" not in line]
    exit_codes = [f"a torchrun worker exited with {' '.join(line.split())}" for line in lines
                  if line.startswith("exitcode")]
    return (errors or exceptions or exit_codes or lines)[-1]


def compile_cache_env(sweep_dir: Path) -> dict[str, str]:
    """The environment that gives a sweep's runs one torch.compile cache: inductor's on-disk caches (compiled
    kernels, FX and autograd graphs) in the sweep's folder, which a cluster's nodes share, unless the user set
    TORCHINDUCTOR_CACHE_DIR. A --compile run then skips the code generation an earlier run of the same graphs
    paid (measured on 2 CPU cores, resnet_tiny: the first epoch 104 s cold, 9.3 s from the cache; RESULTS.md)."""
    return {"TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR",
                                                       str(Path(sweep_dir).resolve() / "torch-compile-cache"))}


def _slot_envs(executor: Executor, device: str, *, sweep_dir: Path) -> list[dict]:
    """Per local worker slot, the environment that pins its runs to its GPUs (executor.ddp of them, round robin
    over the visible ones) or to its share of CPU threads, with the sweep's compile cache (compile_cache_env)."""
    envs = [dict(os.environ, **compile_cache_env(sweep_dir)) for _ in range(executor.workers)]
    if executor.threads:
        for env in envs:
            env.update(OMP_NUM_THREADS=str(executor.threads), MKL_NUM_THREADS=str(executor.threads))
    if executor.kind == "local" and device != "cpu" and torch.cuda.is_available():
        if ":" in device:
            raise UserError(f"--executor local pins each run to one GPU: use --device auto or cuda, "
                                   f"not {device}")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count()))))
        gpus = visible.split(",")
        for slot, env in enumerate(envs):
            mine = range(slot * executor.ddp, (slot + 1) * executor.ddp)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i % len(gpus)] for i in mine)
    return envs


def _submitit_executor(executor: Executor, log_dir: Path, gpus: int):
    """submitit's SlurmExecutor (or LocalExecutor for submitit-local) for jobs of `gpus` GPUs."""
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit: pip install submitit") from None
    if executor.kind == "submitit-local":
        pool = submitit.LocalExecutor(folder=log_dir / "%j")
        pool.update_parameters(timeout_min=executor.time_min)
        return pool
    if not shutil.which("sbatch"):
        raise UserError("--executor slurm: no sbatch on this machine (run it on the cluster's login node)")
    pool = submitit.SlurmExecutor(folder=log_dir / "%j")
    pool.update_parameters(job_name="unlearn", partition=executor.partition, time=executor.time_min, nodes=1,
                           ntasks_per_node=1, cpus_per_task=executor.job_cpus, gpus_per_node=gpus or None)
    return pool
