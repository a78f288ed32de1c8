"""Data-parallel pretraining under torchrun (gloo on CPU): the same training as one process, sharded batches."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT, run_script

# No BatchNorm (per-process statistics) and no augmentation (per-process draws): the one recipe in which two
# processes must train exactly what one process trains, up to the order of float sums.
VIT = ["--dataset", "fashion-mnist", "--arch", "vit_tiny", "--train-subset", "1000", "--val-fraction", "0.02",
       "--epochs", "1", "--batch-size", "100", "--augment", "false", "--retrain", "--forget-class", "3"]


def test_shards_of_a_batch_are_disjoint_and_make_up_the_single_process_batch():
    x, y = torch.arange(23), torch.arange(23)
    seen = torch.zeros(23, dtype=torch.long)
    single = [b for b, _ in common.batches(x, y, 6, shuffle=True, gen=torch.Generator().manual_seed(0),
                                           drop_last=True)]
    shards = [[b for b, _ in common.batches(x, y, 6, shuffle=True, gen=torch.Generator().manual_seed(0),
                                            drop_last=True, shard=(rank, 3), seen=seen)] for rank in range(3)]
    for step, batch in enumerate(single):
        parts = [shard[step] for shard in shards]
        assert [len(p) for p in parts] == [2, 2, 2]
        assert sorted(torch.cat(parts).tolist()) == sorted(batch.tolist())
    assert int((seen == 1).sum()) == 18 and int(seen.max()) == 1  # 23 // 6 batches of 6; drop_last's 5 unseen


@pytest.mark.slow
def test_torchrun_two_processes_train_what_one_process_trains(data_dir, tmp_path):
    single, ddp = tmp_path / "single.safetensors", tmp_path / "ddp.safetensors"
    run_script("pretrain.py", *VIT, "--data-dir", data_dir, "--out", single)
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--log-dir", str(tmp_path / "torchrun"),
                           "pretrain.py", *VIT, "--data-dir", str(data_dir), "--out", str(ddp)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("retrain: vit_tiny on") == 1  # process 0 reports, process 1 is quiet

    meta = json.loads(common.sidecar_path(ddp).read_text())
    n_retain = len(common.data_from_spec(meta["data"], data_dir, "cpu").retain)
    assert meta["world_size"] == 2 and meta["data"] == common.read_sidecar(single)["data"]
    # The epoch's 9 batches of 100 (drop_last leaves the rest of Dr), each image in exactly one process.
    assert meta["history"][0]["seen_once"] == n_retain // 100 * 100 and meta["history"][0]["seen_twice_or_more"] == 0
    a, _ = common.load_checkpoint(single, expect_arch="vit_tiny")
    b, _ = common.load_checkpoint(ddp, expect_arch="vit_tiny")
    diffs = [float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())]
    assert max(diffs) < 1e-5

    # The checkpoint is an ordinary one: evaluate.py scores it against the single-process Retrain.
    run_script("evaluate.py", ddp, "--retrain", single, "--data-dir", data_dir, "--mia-draws", "1",
               "--json", tmp_path / "rows.json")
    reference, row = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert row["path"] == str(ddp) and abs(row["RA"] - reference["RA"]) < 0.5 and abs(row["TA"] - reference["TA"]) < 0.5
