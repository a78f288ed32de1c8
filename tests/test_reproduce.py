"""reproduce.py's smoke profile end to end, resuming, its audit profile, the GPU profiles' dry run, and bench.py's
quick mode and whole runs."""
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
from conftest import ROOT, as_foreground_job, run_script


SMOKE = ["--profile", "smoke", "--mia-draws", "2", "--threads-per-run", "1"]  # one thread: as each local worker


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, data_dir):
    """The smoke profile run serially: its out-root, the first call's output and its results.csv rows."""
    root = tmp_path_factory.mktemp("smoke")
    first = run_script("reproduce.py", *SMOKE, "--out-root", root, "--data-dir", data_dir)
    return root, first, list(csv.DictReader(open(root / "smoke" / "results.csv")))


@pytest.mark.slow
def test_smoke_profile_end_to_end_and_resume(data_dir, smoke_sweep):
    tmp_path, first, rows = smoke_sweep
    flags = [*SMOKE, "--out-root", tmp_path, "--data-dir", data_dir]
    out = tmp_path / "smoke"
    for name in ("results.csv", "table.md", "ua_vs_ra.png", "cost.png"):
        assert (out / name).stat().st_size > 0, name
    # Three Retrain seeds (the floor), and the OMP model's rows scored against the Retrain with its mask.
    assert [r["label"] for r in rows] == ["retrain", "retrain-floor", "original", "finetune", "loraprune",
                                          "retrain-sparse@omp50", "original@omp50", "finetune@omp50",
                                          "loraprune@omp50"]
    assert float(rows[0]["avg_gap"]) == 0 and float(rows[0]["UA"]) == 100 and float(rows[1]["avg_gap"]) > 0
    assert {r["reference"] for r in rows[6:]} == {"retrain-sparse"}  # original@omp50 and the methods on it
    assert {r["reference"] for r in rows[:5]} == {"retrain"}
    table = (out / "table.md").read_text()
    assert "| retrain |" in table and "| loraprune |" in table and "higher = more forgotten" in table
    assert "Retrain-vs-Retrain floor" in table and "| retrain-floor |" in table
    assert first.stdout.count("done in") == 12  # 10 trainings, 2 evaluations (one per starting model)
    assert len(list((out / "evaluations").glob("*.json"))) == 2

    again = run_script("reproduce.py", *flags)
    assert again.stdout.count("skipped (exists)") == 12 and "done in" not in again.stdout
    assert list(csv.DictReader(open(out / "results.csv"))) == rows

    # A checkpoint made with other flags is redone; a narrower rerun keeps the other methods' rows.
    ckpt = next((tmp_path / "ckpt").iterdir())
    side = ckpt / "class3_finetune_s0.json"
    meta = json.loads(side.read_text())
    meta["argv"] = [*meta["argv"], "--lr", "0.5"]
    side.write_text(json.dumps(meta))
    narrower = run_script("reproduce.py", *flags, "--methods", "finetune")
    assert narrower.stdout.count("redone: made with other flags") == 1
    assert narrower.stdout.count("done in") == 3  # finetune, and the two groups without loraprune: other files
    merged = list(csv.DictReader(open(out / "results.csv")))
    assert [r["label"] for r in merged] == [r["label"] for r in rows]  # loraprune's rows kept, in place
    assert [(r["UA"], r["RA"], r["TA"], r["trainable_params"]) for r in merged] == [  # loraprune's, as written
        (r["UA"], r["RA"], r["TA"], r["trainable_params"]) for r in rows]

    # The leftovers of a run killed between its weights and its sidecar are redone, not a blocker.
    (ckpt / "class3_loraprune_s0.json").unlink()
    resumed = run_script("reproduce.py", *flags)
    # loraprune, and the dense group's evaluation (older than loraprune's and finetune's new checkpoints)
    assert resumed.stdout.count("done in") == 2 and resumed.stdout.count("skipped (exists)") == 10

    # --report-only checks results.csv: a truncated or foreign file is refused with one line.
    text = (out / "results.csv").read_text()
    for bad in (text[: len(text) * 2 // 3].rsplit(",", 3)[0] + "\n", "a,b\n1,2\n"):
        (out / "results.csv").write_text(bad)
        proc = run_script("reproduce.py", "--profile", "smoke", "--out-root", tmp_path, "--report-only", check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    (out / "results.csv").write_text(text)

    # --report-only rebuilds the table and plots from results.csv alone, running and evaluating nothing.
    table = (out / "table.md").read_text()  # as the last rerun wrote it (redone runs took other wall times)
    for name in ("table.md", "ua_vs_ra.png", "cost.png"):
        (out / name).unlink()
    rebuilt = run_script("reproduce.py", "--profile", "smoke", "--out-root", tmp_path, "--report-only")
    assert "skipped" not in rebuilt.stdout and "done in" not in rebuilt.stdout
    assert (out / "table.md").read_text() == table and (out / "ua_vs_ra.png").stat().st_size > 0

    # The audit profile reads the finished profile's models from results.csv: every one probed and relearned.
    run_script("reproduce.py", "--profile", "smoke-audit", "--out-root", tmp_path, "--data-dir", data_dir)
    probe = json.loads((tmp_path / "smoke-audit" / "probe.json").read_text())
    assert [r["model"] for r in probe] == ["retrain", "retrain-floor s1", "original", "finetune", "loraprune",
                                           "original@omp50", "finetune@omp50", "loraprune@omp50"]
    relearn = json.loads((tmp_path / "smoke-audit" / "relearn.json").read_text())
    assert all(len(r["curve"]) == 21 for r in relearn) and relearn[2]["steps_to_threshold"] == 0  # the original
    assert (tmp_path / "smoke-audit" / "relearn_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_every_executor_gives_the_serial_results_and_resumes_an_interrupted_sweep(data_dir, smoke_sweep, tmp_path):
    """local --workers 2 killed after two runs, restarted with one run that fails (locally, then as a job of
    submitit's local executor), which the last call resubmits through submitit: the finished runs are not redone,
    and results.csv is the serial sweep's."""
    flags = [*SMOKE, "--out-root", tmp_path, "--data-dir", data_dir]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    local = subprocess.Popen([sys.executable, "reproduce.py", *map(str, flags), "--executor", "local", "--workers",
                              "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    reported = 0
    for line in local.stdout:
        reported += "done in" in line
        if reported == 2:
            os.killpg(local.pid, signal.SIGKILL)  # the whole tree, mid-run: as a crash or scancel would
            break
    local.wait()
    ckpt = next((tmp_path / "ckpt").iterdir())
    finished = [p.name for p in ckpt.glob("*.safetensors") if common.finished(p)]  # a third may have finished
    assert reported == 2 and len(finished) >= 2

    blocker = ckpt / "class3_loraprune_omp50_s0.safetensors"  # a folder where its output goes: it fails
    blocker.mkdir()  # (it needs the OMP model, which needs the original: it cannot have run yet)

    def assert_the_blocker_fails_in_one_line(proc):
        assert proc.returncode == 2 and proc.stderr.startswith("error: 1 run(s) failed, first " + blocker.name)
        assert "exists and is not a regular file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    failing = run_script("reproduce.py", *flags, "--executor", "local", "--workers", "2", check=False)
    assert_the_blocker_fails_in_one_line(failing)
    assert "not run (an input failed)" in failing.stdout  # the OMP group's evaluation waits for it
    assert failing.stdout.count("skipped (exists)") == len(finished)  # 12 runs: these, 1 failed, 1 not run
    assert failing.stdout.count("done in") == 10 - len(finished)
    assert all(f"{name}: skipped (exists)" in failing.stdout for name in finished)
    # A submitit job's failure is read from the job's own log: the same one line.
    as_job = run_script("reproduce.py", *flags, "--executor", "submitit-local", check=False)
    assert_the_blocker_fails_in_one_line(as_job)
    assert as_job.stdout.count("skipped (exists)") == 10 and "done in" not in as_job.stdout

    blocker.rmdir()  # the next call resubmits the failed run and what waited for it, and nothing else
    last = run_script("reproduce.py", *flags, "--executor", "submitit-local")
    assert last.stdout.count("done in") == 2 and last.stdout.count("skipped (exists)") == 10
    assert f"{blocker.name}: done in" in last.stdout

    def without_costs(rows):  # paths differ by out-root; wall time and memory by the machine's load
        return [{k: v for k, v in r.items() if k not in ("path", "wall_time_s", "peak_mem_mb")} for r in rows]
    _, _, serial = smoke_sweep
    assert without_costs(csv.DictReader(open(tmp_path / "smoke" / "results.csv"))) == without_costs(serial)


@pytest.mark.slow
def test_ddp_sweep_trains_from_scratch_under_torchrun_and_resumes(data_dir, tmp_path):
    flags = ["--profile", "smoke", "--methods", "finetune", "--mia-draws", "1", "--ddp", "2", "--threads-per-run", "1",
             "--out-root", tmp_path, "--data-dir", data_dir]
    first = run_script("reproduce.py", *flags)
    assert first.stdout.count("done in") == 10  # original, OMP, 3 Retrains, 2 finetune, sparse Retrain, 2 evaluations
    ckpt = next((tmp_path / "ckpt").iterdir())
    for name in ("original_s0", "omp50_s0", "class3_retrain_s2", "class3_retrain-sparse-omp50_s0"):  # torchrun's
        meta = json.loads((ckpt / f"{name}.json").read_text())
        assert meta["world_size"] == 2, name
        assert all(epoch["seen_twice_or_more"] == 0 and epoch["seen_once"] > 0 for epoch in meta["history"]), name
    assert "world_size" not in json.loads((ckpt / "class3_finetune_s0.json").read_text())  # one process
    assert len(list((tmp_path / "smoke" / "logs" / "torchrun").iterdir())) == 6  # not in the system's /tmp
    rows = list(csv.DictReader(open(tmp_path / "smoke" / "results.csv")))
    assert [r["label"] for r in rows][:4] == ["retrain", "retrain-floor", "original", "finetune"]
    again = run_script("reproduce.py", *flags)
    assert again.stdout.count("skipped (exists)") == 10 and "done in" not in again.stdout


@pytest.mark.slow
def test_gpu_profiles_dry_run_lists_the_paper_commands():
    proc = run_script("reproduce.py", "--profile", "paper-cifar10", "--dry-run")
    assert "--arch resnet50" in proc.stdout and "--arch vit_small" in proc.stdout
    assert "loraprune.py" in proc.stdout and "--val-fraction 0" in proc.stdout
    proc = run_script("reproduce.py", "--profile", "nope", check=False)
    assert proc.returncode == 2 and "unknown profile" in proc.stderr


@pytest.mark.slow
def test_bench_quick_mode_prints_the_loop_ratio_and_times_every_method_between_two_ft_runs(tmp_path):
    proc = run_script("bench.py", "--quick", "--device", "cpu", "--archs", "resnet_tiny,vit_tiny",
                      "--batch-sizes", "16", "--json", tmp_path / "bench.json")
    assert "loop/raw ratio" in proc.stdout and "| vit_tiny | 16 | loraprune |" in proc.stdout
    assert "skipped: needs CUDA" in proc.stdout
    figures = json.loads((tmp_path / "bench.json").read_text())
    (retrain,) = figures["retrain"]  # part 5 in --quick: the Unlearn-Sparse Retrain on 500 images, timed
    import pretrain
    assert retrain["arch"] == "resnet18" and retrain["batch_size"] == 256
    assert retrain["epochs"] == pretrain.RECIPES["resnet18"]["epochs"] == 182  # the recipe's, not the two run
    assert retrain["epoch_s"] > 0 and abs(retrain["retrain_min_extrapolated"] - retrain["epoch_s"] * 182 / 60) < 0.06
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"part": "method_cost"')]
    table = figures["methods"]
    for arch, n_methods in (("resnet_tiny", 6), ("vit_tiny", 5)):  # the methods, and FT between and around them
        order = [r["method"] for r in runs if r["arch"] == arch]
        assert order[::2] == ["finetune"] * (n_methods + 1) and "finetune" not in order[1::2]
        ft_row, *rows = [r for r in table if r["arch"] == arch]
        ft_steps = [r["step_s"] for r in runs if r["arch"] == arch][::2]
        assert ft_row["method"] == "finetune" and ft_row["ft_runs"] == n_methods + 1
        assert ft_row["ft_range_s"] == [min(ft_steps), max(ft_steps)] and ft_row["step_vs_ft"] == 1
        # from the median itself: with an even number of FT runs it has a fifth decimal that step_s rounds away
        assert ft_row["epoch_s_extrapolated"] == round(statistics.median(ft_steps) * 45_000 / 16, 1)
        for i, row in enumerate(rows):  # each method against the mean of the FT runs just before and after it
            assert row["method"] == order[2 * i + 1]
            assert row["ft_step_s"] == round((ft_steps[i] + ft_steps[i + 1]) / 2, 4)
            assert row["step_vs_ft"] == round(row["step_s"] / row["ft_step_s"], 2)
        # read from the scripts' own checkpoints: adapters train a fraction of the weights; activations recorded
        assert all(r["activation_mb"] > 0 and r["timed_steps"] >= 2 for r in [ft_row, *rows])
        adapted = {r["method"] for r in rows if r["trainable_pct"] < 50}
        assert adapted == {r["method"] for r in rows if r["method"].startswith("lora")}
        # FLOPs: masks leave the dense products; a frozen base skips its weight gradients (about a third of the
        # step), adapters add a little back; removing pruned filters computes less. The rate is below the peak's.
        gflop = {r["method"]: r["step_gflop"] for r in [ft_row, *rows]}
        assert gflop["pruneft"] == gflop["finetune"] and gflop["loraprune"] == gflop["lora"]
        assert 2 / 3 * gflop["finetune"] < gflop["lora"] < gflop["finetune"]
        assert gflop["pruneft-shrink"] < gflop["pruneft"] and gflop["loraprune-shrink"] < gflop["loraprune"]
        assert all(0 < r["of_peak"] < 1 for r in [ft_row, *rows])


def test_bench_compares_adapter_dropout_only_where_loras_default_has_it():
    import bench
    assert bench.compared_methods("resnet_tiny") == ["pruneft", "lora", "lora-dropout0", "loraprune",
                                                     "pruneft-shrink", "loraprune-shrink"]
    assert "lora-dropout0" not in bench.compared_methods("vit_tiny")  # ViTs' LoRA default has no dropout


@pytest.mark.slow
def test_bench_runs_a_cpu_configuration_as_its_own_process(tmp_path):
    import bench
    row = bench.method_cost("resnet_tiny", "loraprune-shrink", 16, torch.device("cpu"), 2, tmp_path,
                            in_process=False)
    (sidecar,) = [common.read_sidecar(p) for p in tmp_path.glob("*_loraprune-shrink.safetensors")]
    assert sidecar["peak_mem_kind"] == "process_max_rss" and sidecar["config"]["shrink"]
    assert row["peak_mem_mb"] == round(sidecar["peak_mem_mb"]) and row["timed_steps"] >= 2
    assert row["step_s"] > 0 and row["trainable_params"] == sidecar["trainable_params"] < row["total_params"]


def test_bench_unlearns_random_cifar10_shaped_images_that_need_no_files(tmp_path):
    # Parts 2 and 3 run the method scripts from a random original of the random-cifar10 dataset: seeded, CIFAR-10's
    # shape and classes, nothing read from disk.
    import bench
    original = bench.random_original("resnet_tiny", tmp_path, images=100)
    meta = common.read_sidecar(original)
    assert meta["data"]["dataset"] == "random-cifar10" and meta["data"]["val_fraction"] == 0
    data = common.data_from_spec(dict(meta["data"], forget_class=3), tmp_path / "nothing here", "cpu")
    again = common.make_data("random-cifar10", tmp_path, val_fraction=0.0, train_subset=100, forget_class=3)
    assert data.x_train.shape[1:] == (3, 32, 32) and data.info == common.DATASETS["cifar10"]
    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.forget, again.forget)
    assert len(data.train) == 100 and 0 < len(data.forget) < 30 and len(data.x_test) == 1_000


@pytest.mark.slow
def test_bench_whole_runs_time_the_scripts_between_two_ft_runs(data_dir, tmp_path):
    out = tmp_path / "whole.json"
    run_script("bench.py", "--device", "cpu", "--archs", "resnet_tiny", "--parts", "whole-runs",
               "--whole-run-methods", "loraprune-shrink", "--data-dir", data_dir, "--json", out)
    first_ft, method, last_ft = json.loads(out.read_text())["whole_runs"]
    assert [r["method"] for r in (first_ft, method, last_ft)] == ["finetune", "loraprune-shrink", "finetune"]
    # the same FT run twice: the same model (seeded), only the times differ
    assert first_ft["retain_acc"] == last_ft["retain_acc"] and first_ft["prep_s"] == 0
    assert 0 < method["prep_s"] < method["wall_s"] < method["process_s"]  # pruning, BN re-estimation, adapters
    assert method["wall_vs_ft"] == round(method["wall_s"] / ((first_ft["wall_s"] + last_ft["wall_s"]) / 2), 2)
    proc = run_script("bench.py", "--parts", "loop,everything", check=False)
    assert proc.returncode == 2 and "--parts ['everything']: choose from" in proc.stderr


def test_tuned_settings_are_chosen_by_validation_avg_gap_and_named_in_the_paths(tmp_path):
    import reproduce
    profile = dict(common.PROFILES["cpu-fashion-sparse"], forgets=[["--forget-class", "3"]])
    runs, groups = reproduce.plan_tuning(profile, ["ga", "rl"], [0], tmp_path)
    (group,) = groups
    assert [m for m, _ in group["candidates"].values()] == ["ga"] * len(common.TUNING["ga"])  # rl is not tuned
    assert all(g["floor"] is None for g in groups)
    rows = [dict(arch="resnet_tiny", forget="class3", label=f"ga {' '.join(flags)}", avg_gap=1.0, UA=0.0, TA=0.0)
            for flags in common.TUNING["ga"]]  # a tie: the earlier candidate (the default) wins
    chosen, table = reproduce.select_settings(rows, groups)
    assert chosen == {("ga", "class"): ["--lr", "1e-4"]}
    assert [r["chosen"] for r in table] == [True, False, False, False]
    rows[1]["avg_gap"] = 0.5
    chosen, table = reproduce.select_settings(rows, groups)
    assert chosen == {("ga", "class"): ["--lr", "5e-4"]} and [r["chosen"] for r in table] == [False, True, False, False]
    grid, _ = reproduce.plan(profile, ["ga"], [0], tmp_path, chosen)
    ga_runs = [r for r in grid if r["cmd"][0] == "ga.py"]
    assert {r["out"].name for r in ga_runs} == {"class3_ga-lr-5e-4_s0.safetensors",
                                                "class3_ga@omp50-lr-5e-4_s0.safetensors".replace("@", "_")}
    assert all(r["cmd"][r["cmd"].index("--lr") + 1] == "5e-4" for r in ga_runs)


def test_a_narrower_tuning_replaces_only_its_methods_candidates_in_the_selection(tmp_path):
    import reproduce

    def candidates(method, forget, gaps):
        return [dict(arch="resnet_tiny", forget=forget, method=method, setting=f"--x {i}", val_avg_gap=gap,
                     val_UA=0.0, val_TA=0.0, chosen=gap == min(gaps)) for i, gap in enumerate(gaps)]
    earlier = [*candidates("ssd", "class3", [2, 1]), *candidates("sfron", "class3", [4, 5]),
               *candidates("ssd", "random1200", [3, 1]), *candidates("sfron", "random1200", [6, 7])]
    rerun = [*candidates("sfron", "class3", [4, 5, 1]), *candidates("sfron", "random1200", [6, 7, 2])]
    merged = reproduce.merge_selection(earlier, rerun)
    assert merged == [*earlier[:2], *rerun[:3], *earlier[4:6], *rerun[3:]]  # in place; ssd's kept
    assert reproduce.merge_selection([], rerun) == rerun and reproduce.merge_selection(earlier, []) == earlier

    path = tmp_path / "selection.json"
    assert reproduce.read_selection(path) == []  # no earlier tuning
    for bad in ('{"a": 1}', "[1, 2]", '[{"arch": "resnet_tiny"}]', "not json"):
        path.write_text(bad)
        with pytest.raises(common.UserError, match="selection.json is malformed"):
            reproduce.read_selection(path)


def test_every_profile_names_only_known_methods_and_tunes_only_its_own():
    assert set(common.TUNING) <= set(common.METHODS)
    for name, profile in common.PROFILES.items():
        assert set(profile["methods"]) <= set(common.METHODS), name
        assert set(profile.get("tune", [])) <= set(profile["methods"]) & set(common.TUNING), name
    for method, (script, _) in common.METHODS.items():
        assert (ROOT / script).exists(), method


def test_a_sweep_runs_class_wise_only_methods_on_its_class_forget_sets_alone(tmp_path):
    import reproduce
    profile = common.PROFILES["cpu-fashion-leading"]
    runs, _ = reproduce.plan(profile, ["delete", "ssd"], [0], tmp_path)
    forgets = {(r["cmd"][0], r["out"].name.split("_")[0]) for r in runs if r["kind"] == "method"}
    assert forgets == {("delete.py", "class3"), ("ssd.py", "class3"), ("ssd.py", "random1200")}
    tuning, _ = reproduce.plan_tuning(profile, ["delete"], [0], tmp_path)
    assert {r["out"].name.split("_")[0] for r in tuning if r["kind"] == "method"} == {"class3"}


def test_compare_keeps_the_shared_settings_and_seeds_and_each_model_once(tmp_path):
    import reproduce

    def row(forget, seed, label, path):
        return dict(arch="resnet_tiny", forget=forget, seed=seed, label=label, method=label, path=path,
                    reference="retrain", **{k: 1.0 for k in common.METRICS})
    first = [row(f, s, label, f"{f}_{label}_s{s}") for f in ("class3", "class0") for s in (0, 1)
             for label in ("retrain", "finetune")]
    second = [row(f, s, label, f"{f}_{label}_s{s}") for f in ("class3", "random1200") for s in (0, 1, 2)
              for label in ("retrain", "salun")]
    for name, rows in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        common.write_rows(tmp_path / name / "results.csv", rows, name)
    merged = common.compare_rows(["a", "b"], tmp_path)
    assert {(r["forget"], r["seed"]) for r in merged} == {("class3", 0), ("class3", 1)}
    assert sorted(r["label"] for r in merged) == ["finetune"] * 2 + ["retrain"] * 2 + ["salun"] * 2
    with pytest.raises(reproduce.common.UserError, match="share no"):
        common.compare_rows(["a", "b"], tmp_path, forgets=["random1200"])


def test_slurm_jobs_ask_for_the_runs_resources_and_start_retrains_under_torchrun(monkeypatch, tmp_path):
    import reproduce
    from submitit.slurm.slurm import _make_sbatch_string
    monkeypatch.setattr(common.executors.shutil, "which", lambda name: f"/usr/bin/{name}")  # as on a login node
    executor = common.make_executor("slurm", partition="gpu", time_min=720, gpus=1, cpus=8, parallelism=64,
                                       ddp=4)
    runs, _ = reproduce.plan(common.PROFILES["paper-cifar10"], ["finetune"], [0], tmp_path)
    retrain = next(r for r in runs if r["kind"] == "retrain")
    method = next(r for r in runs if r["kind"] == "method")
    argv = common.script_argv(retrain, executor, data_dir="data", device="auto")
    assert argv[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "pretrain.py"]
    assert common.script_argv(method, executor, data_dir="data", device="auto")[1] == "finetune.py"
    for run, gpus in ((retrain, 4), (method, 1)):
        assert common.job_gpus(run, executor) == gpus
        pool = common.executors._submitit_executor(executor, tmp_path, gpus)
        sbatch = _make_sbatch_string(command="x", folder=tmp_path, **pool.parameters)
        for line in ("--partition=gpu", "--time=720", f"--gpus-per-node={gpus}", "--cpus-per-task=8"):
            assert f"#SBATCH {line}\n" in sbatch, line
    with pytest.raises(reproduce.common.UserError, match="--workers is for --executor local"):
        common.make_executor("slurm", workers=2)


@pytest.mark.slow
def test_ctrl_c_cancels_the_sweeps_slurm_jobs(data_dir, tmp_path):
    """A stand-in SLURM on PATH (sbatch queues, sacct says RUNNING, scancel records) under the real submitit: the
    submitted jobs would outlive an interrupted sweep on a cluster, so Ctrl-C cancels exactly those."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "slurm_calls"
    bin_dir.mkdir()
    commands = {"sbatch": f'echo "sbatch $$" >> {calls}; echo "Submitted batch job $$"',
                "sacct": 'echo "JobID|State|NodeList"; for a in "$@"; do case $a in -*|*[!0-9]*) ;; '
                         '*) echo "$a|RUNNING|node1";; esac; done',
                "scancel": f'echo "scancel $*" >> {calls}', "srun": "exit 1"}  # srun: only looked for
    for name, body in commands.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    sweep = subprocess.Popen([sys.executable, "reproduce.py", *map(str, SMOKE), "--out-root", tmp_path, "--data-dir",
                              data_dir, "--executor", "slurm"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=as_foreground_job)
    for _ in range(600):  # the runs that need no other run's output are submitted at once
        if calls.exists() and "sbatch" in calls.read_text():
            break
        time.sleep(0.1)
    time.sleep(3)  # a poll of sacct, so the jobs count as running
    sweep.send_signal(signal.SIGINT)
    _, stderr = sweep.communicate(timeout=60)
    submitted = [line.split()[1] for line in calls.read_text().splitlines() if line.startswith("sbatch")]
    cancelled = [line.split()[1] for line in calls.read_text().splitlines() if line.startswith("scancel")]
    assert sweep.returncode == 2 and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith(f"error: interrupted: {len(submitted)} run(s) stopped, {len(submitted)} submitted job(s) "
                             "cancelled")
    assert len(submitted) >= 2 and sorted(cancelled) == sorted(submitted)


@pytest.mark.slow
def test_ctrl_c_while_the_warm_interpreter_imports_ends_in_the_sweeps_one_line(data_dir, tmp_path):
    """Ctrl-C in the seconds the warm interpreter (executors.WARM_IMPORTS) spends importing, before any run: the
    sweep's one-line error alone (the server imports with SIGINT blocked, else its own traceback follows), no output."""
    sweep = subprocess.Popen([sys.executable, "reproduce.py", *map(str, SMOKE), "--out-root", tmp_path, "--data-dir",
                              data_dir], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=as_foreground_job)
    deadline = time.monotonic() + 120
    while not _forkserver_in_group(sweep.pid):
        assert time.monotonic() < deadline and sweep.poll() is None, sweep.communicate()
        time.sleep(0.02)
    os.killpg(sweep.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 2 and stderr == ("error: interrupted: 0 run(s) stopped; finished runs are kept, the "
                                                "same command again resumes\n")
    assert not list(tmp_path.rglob("*.safetensors"))


def _forkserver_in_group(group: int) -> bool:
    """Whether a multiprocessing fork server runs in this process group (from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp, ...
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == group and b"multiprocessing.forkserver" in cmdline:
            return True
    return False


# Real interpreters (seconds each to import torch): the slow tier.
@pytest.mark.slow
def test_a_failed_torchrun_run_is_reported_by_its_workers_error_not_the_launchers_banner(tmp_path):
    import reproduce
    script = tmp_path / "crash.py"
    script.write_text("import os, sys\n"
                      "if os.environ['RANK'] == '1' and sys.argv[1] == 'crash': raise RuntimeError('rank 1 broke')\n"
                      "if sys.argv[1] == 'user': sys.exit('error: a bad flag')\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--log-dir", str(tmp_path / "torchrun"), str(script)]
    for how, reason in (("crash", "RuntimeError: rank 1 broke"), ("user", "error: a bad flag")):
        log = tmp_path / f"{how}.log"
        with pytest.raises(reproduce.common.UserError) as failure:
            common.executors._run_process([*torchrun, how], dict(os.environ, OMP_NUM_THREADS="1"), log)
        assert str(failure.value) == f"{reason} (log: {log})"  # once, though both processes may print it
        assert "ChildFailedError" in log.read_text()  # torchrun's own report, ending in a line of '='


# Real interpreters (seconds each to import torch): the slow tier.
@pytest.mark.slow
def test_a_torchrun_process_ends_without_the_interpreters_teardown():
    # DDP keeps its gloo threads alive past destroy_process_group, and tearing them down at exit now and then
    # aborts the process (common.run_main). Stand-in for them: a thread that never ends, which an ordinary exit
    # would wait for forever.
    program = ("import sys, threading, common\n"
               "def main():\n"
               "    threading.Thread(target=threading.Event().wait).start()\n"
               "    print('trained and saved')\n"
               "    if sys.argv[1] == 'fail': raise common.UserError('a bad flag')\n"
               "common.run_main(main)\n")
    for how, status, printed in (("ok", 0, "trained and saved"), ("fail", 2, "error: a bad flag")):
        proc = subprocess.run([sys.executable, "-c", program, how], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=dict(os.environ, WORLD_SIZE="2"))
        assert proc.returncode == status and printed in proc.stdout + proc.stderr


def test_a_sweeps_runs_share_one_compile_cache_in_its_folder_unless_the_user_set_one(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    envs = common.executors._slot_envs(common.make_executor("local", workers=2, threads=1), "cpu", sweep_dir=tmp_path)
    assert [env["TORCHINDUCTOR_CACHE_DIR"] for env in envs] == [str(tmp_path.resolve() / "torch-compile-cache")] * 2
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/shared/compile-cache")
    assert common.compile_cache_env(tmp_path) == {"TORCHINDUCTOR_CACHE_DIR": "/shared/compile-cache"}


@pytest.mark.slow
def test_a_warm_fork_trains_what_a_fresh_interpreter_trains_and_fails_as_it_does(data_dir, tmp_path):
    # The serial and local executors' CPU runs: forks of the warm interpreter (executors.WARM_IMPORTS).
    args = ["pretrain.py", "--dataset", "fashion-mnist", "--arch", "resnet_tiny", "--train-subset", "300",
            "--val-fraction", "0.005", "--epochs", "1", "--data-dir", str(data_dir), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sidecars = {}
    for warm in (False, True):
        out = tmp_path / f"warm{warm}.safetensors"
        common.executors._run_process([sys.executable, *args, "--out", str(out)], env, tmp_path / f"{warm}.log",
                                      warm=warm)
        sidecars[warm] = common.read_sidecar(out)
        assert f"-> {out}" in (tmp_path / f"{warm}.log").read_text()  # its output went to its log
    assert sidecars[True]["weights_sha256"] == sidecars[False]["weights_sha256"]
    assert sidecars[True]["history"][0]["loss"] == sidecars[False]["history"][0]["loss"]
    assert (sidecars[False]["peak_mem_kind"], sidecars[True]["peak_mem_kind"]) == ("process_max_rss",
                                                                                  "forked_process_max_rss")
    for bad, reason in ((["--epochs", "0"], "not a positive integer"),  # argparse's error
                        (["--arch", "resnet_huge"], "unknown architecture")):  # run_main's UserError
        log = tmp_path / "bad.log"
        with pytest.raises(common.UserError, match=reason) as failure:
            common.executors._run_process([sys.executable, *args, *bad], env, log, warm=True)
        assert str(failure.value).endswith(f"(log: {log})") and "Traceback" not in log.read_text()
