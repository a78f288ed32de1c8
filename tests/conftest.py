"""Shared fixtures: small real models trained once per test session on a Fashion-MNIST subset."""
import contextlib
import importlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (the project root is on the path only now)

# Small but real: a 4,000-image training subset, the CPU-sized ResNet, a few epochs.
SUBSET = ["--dataset", "fashion-mnist", "--train-subset", "4000", "--val-fraction", "0.1"]
TINY_RESNET = ["--arch", "resnet_tiny", "--epochs", "6", "--batch-size", "64", "--lr", "0.1"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the project's scripts end to end or needs a trained model "
                                       "(the session fixtures); `pytest -m 'not slow'` leaves them out")
    if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        # pytest-xdist: the cores shared out between the workers and the scripts they start, not each taking all.
        threads = max(len(os.sched_getaffinity(0)) // int(workers), 1)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# The files whose tests run for minutes (sweeps, shadow populations, torchrun), collected first: under pytest-xdist
# they start early, and the short tests fill both workers at the end instead of one worker finishing a sweep alone.
LONGEST_FIRST = ("test_reproduce.py", "test_audit.py", "test_distributed.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def run_script(script: str, *args, check: bool = True, process: bool = False) -> subprocess.CompletedProcess:
    """Run one of the project's scripts with this command line: its exit status, standard output and error. In this
    process by default (main() through common.run_main, as the script's entry point calls it, with the global state
    a run touches restored afterwards); process=True runs it through the real interpreter, for the tests where the
    process itself is what is tested. With check, a failure fails the test with the script's output."""
    argv = [script, *map(str, args)]
    proc = _in_a_process(argv) if process else _in_this_process(argv)
    if check and proc.returncode != 0:
        # A sweep's failed run names its log, which lives in the test's temporary folder: show its end here.
        logs = dict.fromkeys(Path(p) for p in re.findall(r"\(log: ([^)]+)\)", proc.stderr) if Path(p).is_file())
        tails = "".join(f"\n--- end of {log}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                    f"{proc.stderr[-3000:]}{tails}")
    return proc


def as_foreground_job() -> None:
    """preexec_fn of a process a test interrupts with SIGINT: SIGINT's default action, as a terminal's foreground
    job has it. A test run started in the background by a non-interactive shell (`pytest &` in a script) ignores
    SIGINT, and its children inherit that: they would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _in_a_process(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@contextlib.contextmanager
def _isolated(argv: list[str]):
    """sys.argv set to the command line, the working directory the project root; the random generators, the thread
    count and the working directory as they were afterwards."""
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate(), torch.get_num_threads(), os.getcwd(),
             sys.argv)
    os.chdir(ROOT)
    sys.argv = argv
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])
        torch.set_num_threads(saved[3])
        os.chdir(saved[4])
        sys.argv = saved[5]


def _in_this_process(argv: list[str]) -> subprocess.CompletedProcess:
    module = importlib.import_module(Path(argv[0]).stem)
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with _isolated(argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            common.run_main(module.main)
        except SystemExit as stop:  # argparse's errors and --help, run_main's status 2
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        except Exception:  # a crash: the traceback, exit status 1, as the interpreter would
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def copy_sidecar(source: Path, weights: Path) -> None:
    """Give `weights` the sidecar of `source` with a matching checksum: a file that passes the integrity check."""
    meta = json.loads(common.sidecar_path(source).read_text())
    meta["weights_sha256"] = common.file_sha256(weights)
    common.sidecar_path(weights).write_text(json.dumps(meta))


@pytest.fixture(autouse=True)
def no_lock_file_left(request):
    """After every test, no output lock file is left in its folder: a finished or failed run removes its own."""
    folder = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    left = sorted(folder.rglob(".*.lock")) if folder else []
    assert not left, f"lock files left behind: {left}"


def made_once(out: Path, script: str, *args) -> Path:
    """`script` run with these arguments and `--out out`, unless `out` is already there: a trained fixture is made
    once per test run, by whichever pytest-xdist worker asks first (the others wait for it, then read it)."""
    with common.exclusive(out.parent / f".{out.name}.fixture.lock"):
        if not common.finished(out):
            run_script(script, *args, "--out", out)
    return out


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """The trained fixtures' folder: one per test run, shared by the pytest-xdist workers (their common parent)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / "work"
        path.mkdir(exist_ok=True)
        yield path  # another worker may still be writing here: its own tests check their lock files
        return
    path = tmp_path_factory.mktemp("work")
    yield path
    left = sorted(path.rglob(".*.lock"))
    assert not left, f"lock files left behind: {left}"


# The tests' test split: the first 2,000 of Fashion-MNIST's 10,000 test images (about 200 per class). Passes over
# the test split (each script's closing report, evaluate.py's accuracies and its attacks' non-members, the shadow
# populations' RMIA reference images) were most of a short run's time; the training split is whole.
TEST_IMAGES = 2000


def _write_first_images(source: Path, target: Path, count: int) -> None:
    """The first `count` items of an IDX file (MNIST's on-disk format: magic, then big-endian dimensions, then the
    items), as an IDX file of its own."""
    raw = source.read_bytes()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    item_bytes = int(np.prod(shape[1:], dtype=np.int64))
    header = raw[:4] + b"".join(n.to_bytes(4, "big") for n in [count, *shape[1:]])
    items = raw[4 + 4 * dims: 4 + 4 * dims + count * item_bytes]
    common.atomic_write(target, lambda tmp: tmp.write_bytes(header + items))


@pytest.fixture(scope="session")
def full_data_dir(workdir) -> Path:
    """Fashion-MNIST as the project unpacks it from the Debian package: both official splits whole."""
    path = workdir / "full_data"
    with common.exclusive(workdir / ".full_data.fixture.lock"):
        common.load_dataset("fashion-mnist", path)
    return path


@pytest.fixture(scope="session")
def data_dir(workdir, full_data_dir) -> Path:
    """Fashion-MNIST in torchvision's layout with the whole training split and the first TEST_IMAGES test images."""
    path = workdir / "data"
    source, raw = full_data_dir / "FashionMNIST" / "raw", path / "FashionMNIST" / "raw"
    with common.exclusive(workdir / ".data.fixture.lock"):
        raw.mkdir(parents=True, exist_ok=True)
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
            if not (raw / name).exists():
                os.link(source / name, raw / name)  # the same folder tree: the same bytes, appearing whole
        for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            if not (raw / name).exists():
                _write_first_images(source / name, raw / name, TEST_IMAGES)
    return path


@pytest.fixture(scope="session")
def original(workdir, data_dir) -> Path:
    """An original resnet_tiny trained on the subset (about 81% test accuracy)."""
    return made_once(workdir / "original.safetensors", "pretrain.py", *SUBSET, *TINY_RESNET, "--data-dir", data_dir)


@pytest.fixture(scope="session")
def retrain(workdir, data_dir) -> Path:
    """Retrain for forget class 3 on the same subset and recipe."""
    return made_once(workdir / "retrain_class3.safetensors", "pretrain.py", *SUBSET, *TINY_RESNET, "--retrain",
                     "--forget-class", "3", "--data-dir", data_dir)


@pytest.fixture(scope="session")
def original_small(workdir, data_dir) -> Path:
    """A resnet_tiny that saw 300 images once: for checks of a script's mechanics, not of what it learns."""
    return made_once(workdir / "original_small.safetensors", "pretrain.py", "--dataset", "fashion-mnist", "--arch",
                     "resnet_tiny", "--train-subset", "300", "--epochs", "1", "--data-dir", data_dir)


@pytest.fixture(scope="session")
def retrain_seed1(workdir, data_dir) -> Path:
    """A second Retrain for forget class 3 (seed 1): the seed-noise floor."""
    return made_once(workdir / "retrain_class3_s1.safetensors", "pretrain.py", *SUBSET, *TINY_RESNET, "--retrain",
                     "--forget-class", "3", "--seed", "1", "--data-dir", data_dir)


@pytest.fixture(scope="session")
def original_vit(workdir, data_dir) -> Path:
    return made_once(workdir / "original_vit.safetensors", "pretrain.py", *SUBSET, "--arch", "vit_tiny", "--epochs",
                     "2", "--data-dir", data_dir)


@pytest.fixture(scope="session")
def retrain_random(workdir, data_dir) -> Path:
    """Retrain for a random forget set of 300 images (forget seed 0) on the same subset and recipe."""
    return made_once(workdir / "retrain_random300.safetensors", "pretrain.py", *SUBSET, *TINY_RESNET, "--retrain",
                     "--forget-random", "300", "--data-dir", data_dir)


@pytest.fixture(scope="session")
def omp(original, data_dir, workdir) -> Path:
    """The original pruned to 50% by OMP (global L1 magnitude, rewind to epoch 1, retrain with the mask)."""
    return made_once(workdir / "omp50.safetensors", "prune.py", "--model", original, "--sparsity", "0.5",
                     "--rewind-epoch", "1", "--data-dir", data_dir)


aten = torch.ops.aten


class HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for a tensor's value while the mode is active and not paused:
    .item(), float(), bool() and int() of a tensor (aten._local_scalar_dense), results whose shape depends on the
    values (nonzero, masked_select, boolean indexing), and copies to the host (.cpu(), .tolist(), .numpy(): no-ops
    on a CPU tensor, which the dispatcher does not see, waits on a GPU one). On a GPU each stalls the kernel queue."""
    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False
        self._copies = _HostCopies(self)

    def __enter__(self):
        self._copies.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._copies.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and (func in (aten._local_scalar_dense.default, aten.nonzero.default,
                                         aten.masked_select.default)
                                or func is aten.index.Tensor and any(i is not None and i.dtype == torch.bool
                                                                     for i in args[1])):
            self.count += 1
        return func(*args, **(kwargs or {}))


class _HostCopies(TorchFunctionMode):
    """HostReads' count of the tensor methods that copy values to the host."""
    COPIES = (torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy)

    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.reads.paused and func in self.COPIES:
            self.reads.count += 1
        return func(*args, **(kwargs or {}))


def assert_no_read_per_step(runs: list[dict]) -> None:
    """Each train_loop run (train_loop_reads) took more steps than epochs and read at most once per epoch."""
    assert runs, "the script trained through common.train_loop"
    for run in runs:
        assert run["reads"] <= run["epochs"] < run["steps"], run


@pytest.fixture
def train_loop_reads(monkeypatch):
    """The list of every common.train_loop run during the test: its epochs, steps and host reads (HostReads) made
    by the loop, its batches and its loss function. Not counted: after_epoch's validation, and torch's optimizer
    step, whose step counters live on the host by design (a read there waits for no device). The real
    train_loop runs."""
    runs, real_train_loop = [], common.train_loop

    def counted(model, optimizer, epochs, epoch_batches, loss_fn, *, after_epoch=None, **options):
        reads, run = HostReads(), dict(epochs=epochs, steps=0)

        def counted_loss(model, batch):
            run["steps"] += 1
            return loss_fn(model, batch)

        def uncounted_after_epoch(epoch):
            reads.paused = True
            try:
                return after_epoch(epoch)
            finally:
                reads.paused = False
        def pause(*_):
            reads.paused = True

        def resume(*_):
            reads.paused = False
        hooks = [optimizer.register_step_pre_hook(pause), optimizer.register_step_post_hook(resume)]
        with reads:
            result = real_train_loop(model, optimizer, epochs, epoch_batches, counted_loss,
                                     after_epoch=after_epoch and uncounted_after_epoch, **options)
        for hook in hooks:
            hook.remove()
        runs.append(dict(run, reads=reads.count))
        return result
    monkeypatch.setattr(common, "train_loop", counted)
    return runs
