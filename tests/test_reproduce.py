"""reproduce.py's smoke profile end to end, resuming, the GPU profiles' dry run, and bench.py's quick mode."""
import csv

from conftest import run_script


def test_smoke_profile_end_to_end_and_resume(data_dir, tmp_path):
    first = run_script("reproduce.py", "--profile", "smoke", "--out-root", tmp_path, "--data-dir", data_dir)
    out = tmp_path / "smoke"
    for name in ("results.csv", "table.md", "ua_vs_ra.png", "cost.png"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["label"] for r in rows] == ["retrain", "original", "finetune", "loraprune"]
    assert float(rows[0]["avg_gap"]) == 0 and float(rows[0]["UA"]) == 100
    table = (out / "table.md").read_text()
    assert "| retrain |" in table and "| loraprune |" in table and "higher = more forgotten" in table
    assert first.stdout.count("done in") == 4

    again = run_script("reproduce.py", "--profile", "smoke", "--out-root", tmp_path, "--data-dir", data_dir)
    assert again.stdout.count("skipped (exists)") == 4 and "done in" not in again.stdout
    assert list(csv.DictReader(open(out / "results.csv"))) == rows

    # --report-only rebuilds the table and plots from results.csv alone, running and evaluating nothing.
    for name in ("table.md", "ua_vs_ra.png", "cost.png"):
        (out / name).unlink()
    rebuilt = run_script("reproduce.py", "--profile", "smoke", "--out-root", tmp_path, "--report-only")
    assert "skipped" not in rebuilt.stdout and "done in" not in rebuilt.stdout
    assert (out / "table.md").read_text() == table and (out / "ua_vs_ra.png").stat().st_size > 0


def test_gpu_profiles_dry_run_lists_the_paper_commands():
    proc = run_script("reproduce.py", "--profile", "paper-cifar10", "--dry-run")
    assert "--arch resnet50" in proc.stdout and "--arch vit_small" in proc.stdout
    assert "loraprune.py" in proc.stdout and "--val-fraction 0" in proc.stdout
    proc = run_script("reproduce.py", "--profile", "nope", check=False)
    assert proc.returncode == 2 and "unknown profile" in proc.stderr


def test_bench_quick_mode_prints_the_loop_ratio():
    proc = run_script("bench.py", "--quick", "--device", "cpu", "--archs", "resnet_tiny,vit_tiny")
    assert "loop/raw ratio" in proc.stdout and "| vit_tiny | loraprune |" in proc.stdout
    assert "skipped: needs CUDA" in proc.stdout
