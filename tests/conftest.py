"""Shared fixtures: small real models trained once per test session on a Fashion-MNIST subset."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (the project root is on the path only now)

# Small but real: a 4,000-image training subset, the CPU-sized ResNet, a few epochs.
SUBSET = ["--dataset", "fashion-mnist", "--train-subset", "4000", "--val-fraction", "0.1"]
TINY_RESNET = ["--arch", "resnet_tiny", "--epochs", "6", "--batch-size", "64", "--lr", "0.1"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the project's scripts as subprocesses or needs a trained model "
                                       "(the session fixtures); `pytest -m 'not slow'` leaves them out")


def run_script(script: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would; fail the test with its output if it fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        # A sweep's failed run names its log, which lives in the test's temporary folder: show its end here.
        logs = dict.fromkeys(Path(p) for p in re.findall(r"\(log: ([^)]+)\)", proc.stderr) if Path(p).is_file())
        tails = "".join(f"\n--- end of {log}\n{log.read_text()[-3000:]}" for log in logs)
        pytest.fail(f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                    f"{proc.stderr[-3000:]}{tails}")
    return proc


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


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("work")
    yield path
    left = sorted(path.rglob(".*.lock"))
    assert not left, f"lock files left behind: {left}"


@pytest.fixture(scope="session")
def data_dir(workdir) -> Path:
    return workdir / "data"


@pytest.fixture(scope="session")
def original(workdir, data_dir) -> Path:
    """An original resnet_tiny trained on the subset (about 81% test accuracy)."""
    out = workdir / "original.safetensors"
    run_script("pretrain.py", *SUBSET, *TINY_RESNET, "--data-dir", data_dir, "--out", out)
    return out


@pytest.fixture(scope="session")
def retrain(workdir, data_dir) -> Path:
    """Retrain for forget class 3 on the same subset and recipe."""
    out = workdir / "retrain_class3.safetensors"
    run_script("pretrain.py", *SUBSET, *TINY_RESNET, "--retrain",
               "--forget-class", "3", "--data-dir", data_dir, "--out", out)
    return out


@pytest.fixture(scope="session")
def retrain_seed1(workdir, data_dir) -> Path:
    """A second Retrain for forget class 3 (seed 1): the seed-noise floor."""
    out = workdir / "retrain_class3_s1.safetensors"
    run_script("pretrain.py", *SUBSET, *TINY_RESNET, "--retrain", "--forget-class", "3", "--seed", "1",
               "--data-dir", data_dir, "--out", out)
    return out


@pytest.fixture(scope="session")
def original_vit(workdir, data_dir) -> Path:
    out = workdir / "original_vit.safetensors"
    run_script("pretrain.py", *SUBSET, "--arch", "vit_tiny", "--epochs", "2", "--data-dir", data_dir, "--out", out)
    return out


@pytest.fixture(scope="session")
def retrain_random(workdir, data_dir) -> Path:
    """Retrain for a random forget set of 300 images (forget seed 0) on the same subset and recipe."""
    out = workdir / "retrain_random300.safetensors"
    run_script("pretrain.py", *SUBSET, *TINY_RESNET, "--retrain",
               "--forget-random", "300", "--data-dir", data_dir, "--out", out)
    return out


@pytest.fixture(scope="session")
def omp(original, data_dir, workdir) -> Path:
    """The original pruned to 50% by OMP (global L1 magnitude, rewind to epoch 1, retrain with the mask)."""
    out = workdir / "omp50.safetensors"
    run_script("prune.py", "--model", original, "--sparsity", "0.5", "--rewind-epoch", "1", "--data-dir", data_dir,
               "--out", out)
    return out
