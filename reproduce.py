"""Run a grid of methods x forget settings x seeds for a named profile, evaluate every unlearned model against
the Retrain of the same forget set and seed, and report mean +/- std with plots.

    python reproduce.py --profile cpu-fashion            # ~55 min on 2 CPU cores (RESULTS.md)
    python reproduce.py --profile paper-cifar10 --dry-run
    python reproduce.py --profile cpu-fashion --report-only   # table.md and plots again from results.csv
    python reproduce.py --compare cpu-fashion,cpu-fashion-sparse   # finished profiles in one table (compare.md)
    python reproduce.py --profile cpu-fashion --executor local --workers 4    # 4 runs at a time (GPUs or cores)
    python reproduce.py --profile paper-cifar10 --executor slurm --slurm-partition gpu   # jobs through submitit

Each run is one of the project's scripts in a subprocess (or a SLURM job); a run starts once the runs that
write its inputs have finished. Checkpoints go to <out-root>/ckpt/ (shared by the profiles, so the same original
or Retrain is trained once); a run whose checkpoint exists is skipped, so an interrupted sweep resumes, with any
executor (Ctrl-C cancels the SLURM jobs it has submitted). Each group's evaluate.py JSON goes to
<profile>/evaluations/, each run's log to <profile>/logs/. Writes <out-root>/<profile>/results.csv (one row per
model and run), table.md (mean +/- std per forget kind and method, Retrain first, directions stated), PNG plots,
and where it tunes, selection.md and .json (every candidate's validation figures, the chosen one marked). A rerun
with --methods replaces those methods' rows in results.csv and the selection, and keeps the others'.
"""
import argparse
import collections
import functools
import hashlib
import json
import time
from pathlib import Path

import common


def forget_tag(forget: list[str]) -> str:
    return ("class" if forget[0] == "--forget-class" else "random") + forget[1]


def kind_of(tag: str) -> str:
    return "class" if tag.startswith("class") else "random"


def retrain_seeds(seeds: list[int]) -> list[int]:
    """The method seeds, topped up with the next unused seeds to MIN_RETRAIN_SEEDS Retrains (common.profiles)."""
    extra = (s for s in range(max(seeds) + 1, max(seeds) + 1 + common.MIN_RETRAIN_SEEDS))
    return seeds + [next(extra) for _ in range(common.MIN_RETRAIN_SEEDS - len(seeds))]


def _base(profile: dict, arch: str, ckpt: Path) -> tuple[Path, list]:
    """The checkpoint folder of one (dataset, arch, pretraining flags), and pretrain.py's command prefix."""
    base = ckpt / f"{profile['dataset']}_{arch}_{'_'.join(profile['pretrain']).replace('--', '') or 'default'}"
    return base, ["pretrain.py", "--dataset", profile["dataset"], "--arch", arch, *profile["pretrain"]]


def _method_run(profile: dict, base: Path, method: str, tuned: list[str], *, label: str, tag: str, forget: list,
                source: Path, seed: int) -> dict:
    """One unlearning run; the tuned flags are part of its file name, so another setting is another file."""
    script, flags = common.METHODS[method]
    slug = "-".join(f.removeprefix("--") for f in tuned)
    out = base / f"{tag}_{label.replace('@', '_')}{'-' + slug if slug else ''}_s{seed}.safetensors"
    extra = profile.get("method_flags", {}).get(method, [])
    return dict(kind="method", out=out, cmd=[script, "--model", source, *forget, *flags, *tuned, *extra,
                                             "--seed", seed])


def skipped(method: str, kind: str) -> bool:
    """Whether a sweep leaves the method out of a forget setting of this kind (CLASS_WISE_ONLY on "random")."""
    return kind == "random" and method in common.CLASS_WISE_ONLY


def plan_tuning(profile: dict, methods: list[str], seeds: list[int], ckpt: Path) -> tuple[list[dict], list[dict]]:
    """The candidate runs of the profile's tuned methods (first seed, first forget setting of each kind, dense
    original) and one validation-split evaluation group per (arch, forget setting)."""
    runs, groups = [], []
    seed = seeds[0]
    for arch in profile["archs"]:
        base, pretrain = _base(profile, arch, ckpt)
        original = base / f"original_s{seed}.safetensors"
        runs.append(dict(kind="original", out=original, cmd=[*pretrain, "--seed", seed]))
        for kind in ("class", "random"):
            forget = next((f for f in profile["forgets"] if kind_of(forget_tag(f)) == kind), None)
            tuned = [m for m in profile.get("tune", []) if m in methods and not skipped(m, kind)]
            if forget is None or not tuned:
                continue
            tag = forget_tag(forget)
            retrain = base / f"{tag}_retrain_s{seed}.safetensors"
            runs.append(dict(kind="retrain", out=retrain, cmd=[*pretrain, "--retrain", *forget, "--seed", seed]))
            group = dict(arch=arch, forget=tag, seed=seed, variant="dense", retrain=retrain, floor=None,
                         source=original, methods={}, sparse_retrain=None, candidates={})
            for method in tuned:
                for candidate in common.TUNING[method]:
                    run = _method_run(profile, base, method, candidate, label=method, tag=tag, forget=forget,
                                      source=original, seed=seed)
                    runs.append(run)
                    label = f"{method} {' '.join(candidate)}"
                    group["methods"][label] = run["out"]
                    group["candidates"][label] = (method, candidate)
            groups.append(group)
    return runs, groups


def select_settings(tuning_rows: list[dict], groups: list[dict]) -> tuple[dict, list[dict]]:
    """The candidate with the smallest validation Avg Gap per (method, kind); and the table of all candidates."""
    chosen, table = {}, []
    for group in groups:
        kind = kind_of(group["forget"])
        rows = {r["label"]: r for r in tuning_rows if r["forget"] == group["forget"] and r["arch"] == group["arch"]}
        for method in dict.fromkeys(m for m, _ in group["candidates"].values()):
            candidates = [(label, flags) for label, (m, flags) in group["candidates"].items() if m == method]
            if not candidates:
                continue  # every candidate failed: the grid runs the script's own default (and fails alike)
            best_label, best_flags = min(candidates, key=lambda c: rows[c[0]]["avg_gap"])  # min keeps the first tie
            chosen[(method, kind)] = best_flags
            table += [dict(arch=group["arch"], forget=group["forget"], method=method, setting=" ".join(flags),
                           val_avg_gap=rows[label]["avg_gap"], val_UA=rows[label]["UA"], val_TA=rows[label]["TA"],
                           chosen=label == best_label) for label, flags in candidates]
    return chosen, table


def plan(profile: dict, methods: list[str], seeds: list[int], ckpt: Path,
         chosen: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Every training run in dependency order ({kind, out, cmd}), and the evaluation groups.

    A group is one evaluate.py call: the models that start from one original (dense or OMP) for one forget set
    and seed, with their references: Retrain of that seed, the next seed's Retrain (the floor) and a sparse
    Retrain (the OMP model's mask, or the mask of the profile's sparse_reference_of method). chosen maps
    (method, kind) to the tuned flags selected on the validation split (select_settings)."""
    runs, groups = [], []
    chosen = chosen or {}
    all_seeds = retrain_seeds(seeds)
    for arch in profile["archs"]:
        base, pretrain = _base(profile, arch, ckpt)
        for seed in seeds:
            originals = {"dense": base / f"original_s{seed}.safetensors"}
            runs.append(dict(kind="original", out=originals["dense"], cmd=[*pretrain, "--seed", seed]))
            for sparsity in profile.get("omp", []):
                omp = base / f"omp{round(sparsity * 100)}_s{seed}.safetensors"
                runs.append(dict(kind="omp", out=omp, cmd=["prune.py", "--model", originals["dense"], "--sparsity",
                                                           sparsity, *profile.get("omp_flags", []), "--seed", seed]))
                originals[f"omp{round(sparsity * 100)}"] = omp
            for forget in profile["forgets"]:
                tag = forget_tag(forget)
                retrain_of = {s: base / f"{tag}_retrain_s{s}.safetensors" for s in all_seeds}
                for s in all_seeds:
                    if not any(r["out"] == retrain_of[s] for r in runs):
                        runs.append(dict(kind="retrain", out=retrain_of[s],
                                         cmd=[*pretrain, "--retrain", *forget, "--seed", s]))
                floor = retrain_of[all_seeds[(all_seeds.index(seed) + 1) % len(all_seeds)]]
                for variant, source in originals.items():
                    group = dict(arch=arch, forget=tag, seed=seed, variant=variant, retrain=retrain_of[seed],
                                 floor=floor, source=source, methods={}, sparse_retrain=None)
                    for method in [m for m in methods if not skipped(m, kind_of(tag))]:
                        label = method if variant == "dense" else f"{method}@{variant}"
                        runs.append(_method_run(profile, base, method, chosen.get((method, kind_of(tag)), []),
                                                label=label, tag=tag, forget=forget, source=source, seed=seed))
                        group["methods"][label] = runs[-1]["out"]
                    mask_source = source if variant != "dense" else group["methods"].get(
                        profile.get("sparse_reference_of"))
                    if mask_source:
                        sparse = base / f"{tag}_retrain-sparse-{variant if variant != 'dense' else 'pruned'}" \
                                        f"_s{seed}.safetensors"
                        runs.append(dict(kind="retrain-sparse", out=sparse, cmd=[
                            *pretrain, "--retrain", *forget, "--mask-from", mask_source, "--seed", seed]))
                        group["sparse_retrain"] = sparse
                    groups.append(group)
    return runs, groups


def evaluation_run(group: dict, out_dir: Path, *, split: str, mia_draws: int) -> dict:
    """The evaluate.py run of one group (its JSON named by the group and a digest of the command, so a group with
    other models or references is another file)."""
    floor = ["--floor", group["floor"]] if group["floor"] else []
    sparse = ["--sparse-retrain", group["sparse_retrain"]] if group["sparse_retrain"] else []
    cmd = ["evaluate.py", group["source"], *group["methods"].values(), "--retrain", group["retrain"], *floor,
           *sparse, "--split", split, "--mia-draws", mia_draws]
    digest = hashlib.sha1(" ".join(map(str, cmd)).encode()).hexdigest()[:10]
    name = f"{group['arch']}_{group['forget']}_s{group['seed']}_{group['variant']}_{split}_{digest}.json"
    return dict(kind="evaluation", out=out_dir / "evaluations" / name, cmd=cmd)


def evaluation_rows(groups: list[dict], evaluations: list[dict]) -> list[dict]:
    """The rows of each group's evaluation, labelled; the references' rows kept once per (arch, forget, seed)."""
    rows, seen = [], set()
    for group, evaluation in zip(groups, evaluations):
        variant = "" if group["variant"] == "dense" else f"@{group['variant']}"
        labels = {str(group["retrain"]): "retrain", str(group["source"]): f"original{variant}",
                  **{str(out): label for label, out in group["methods"].items()}}
        if group["floor"]:
            labels[str(group["floor"])] = "retrain-floor"
        if group["sparse_retrain"]:
            labels[str(group["sparse_retrain"])] = f"retrain-sparse{variant or '-pruned'}"
        for row in json.loads(evaluation["out"].read_text())["rows"]:
            key = (group["arch"], group["forget"], group["seed"], row["path"])
            if key not in seen:
                seen.add(key)
                rows.append(dict(row, arch=group["arch"], forget=group["forget"], seed=group["seed"],
                                 label=labels[row["path"]]))
    return rows


SELECTION_KEYS = ("arch", "forget", "method", "setting", "val_avg_gap", "val_UA", "val_TA", "chosen")


def read_selection(path: Path) -> list[dict]:
    """An earlier tuning's candidates (selection.json; none if absent), checked."""
    if not path.exists():
        return []
    try:
        table = json.loads(path.read_text())
        if not all(isinstance(row, dict) and set(row) == set(SELECTION_KEYS) for row in table):
            raise ValueError("not a list of candidate rows")
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise common.UserError(f"{path} is malformed ({str(err)[:80]}): not this version's output") from None
    return table


def merge_selection(previous: list[dict], table: list[dict]) -> list[dict]:
    """A rerun's candidates replace the earlier ones of the same (arch, forget, method), in place; the other
    methods' stay, as their rows stay in results.csv (merge_rows)."""
    def key(row):
        return row["arch"], row["forget"], row["method"]
    fresh, merged, placed = {}, [], set()
    for row in table:
        fresh.setdefault(key(row), []).append(row)
    for row in previous:
        if key(row) not in fresh:
            merged.append(row)
        elif key(row) not in placed:
            merged += fresh[key(row)]
            placed.add(key(row))
    return merged + [row for row in table if key(row) not in placed]


def selection_report(table: list[dict]) -> str:
    """Markdown: every candidate's validation figures and which one the grid uses."""
    lines = ["Settings chosen on the VALIDATION split (evaluate.py --split val): per method and forget kind, the "
             "candidate with the smallest validation Avg Gap to Retrain; the test set was not read.\n",
             "| arch | forget | method | setting | val Avg Gap ↓ | val UA | val TA | chosen |", "|" + "---|" * 8]
    lines += [f"| {r['arch']} | {r['forget']} | {r['method']} | `{r['setting']}` | {r['val_avg_gap']:.2f} | "
              f"{r['val_UA']:.2f} | {r['val_TA']:.2f} | {'**yes**' if r['chosen'] else ''} |" for r in table]
    return "\n".join(lines) + "\n"


def population_setup(kind: str, spec: dict, root: Path) -> tuple[dict, Path]:
    """An audit profile's population (kind "lira" or "klom"): its methods (name -> command) and checkpoint folder."""
    methods = common.method_commands(spec["methods"], spec["method_flags"])
    flags = [*spec["pretrain"], *spec.get("forget", [])]
    return methods, root / "ckpt" / (f"{kind}_" + "_".join(str(a).removeprefix("--") for a in flags
                                                         if a not in ("--dataset", "--arch")))


def run_audit_profile(name: str, spec: dict, root: Path, data_dir: str, device: str, *,
                      executor: common.Executor | None = None, dry_run: bool = False) -> list[Path]:
    """probe and relearn on every model of the audited profiles, then U-LiRA and RMIA on a shadow population and
    KLOM on populations of its own; returns the files written."""
    out_dir, written = root / name, []
    relearn_settings = spec.get("relearn_settings", {})  # common.audit's keywords; its defaults otherwise
    relearn_steps = relearn_settings.get("relearn_steps", common.RELEARN_STEPS)
    if dry_run:
        runs = []
        if spec["lira"]:
            methods, ckpt = population_setup("lira", spec["lira"], root)
            runs += common.shadow_runs(spec["lira"]["pretrain"], methods, shadows=spec["lira"]["shadows"],
                                       pool=spec["lira"]["pool"], pool_seed=0, ckpt_dir=ckpt)[0]
        if spec.get("klom"):
            methods, ckpt = population_setup("klom", spec["klom"], root)
            runs += common.klom_runs(spec["klom"]["pretrain"], methods, forget=spec["klom"]["forget"],
                                     models=spec["klom"]["models"], ckpt_dir=ckpt)[0]
        executor = executor or common.Executor()
        print("\n".join(common.command_line(r, executor, data_dir=data_dir, device=device) for r in runs))
        print(f"then probe {spec['probe']} and relearn {spec['relearn']} on every seed-{spec['seeds']} model of "
              f"{', '.join(spec['of'])} (their results.csv)")
        return []
    for kind in [k for k in ("probe", "relearn") if spec[k]]:
        rows, report = [], []
        for group in common.audit_groups(spec["of"], root, spec[kind], spec["seeds"]):
            labels = {path: label for label, path in group["models"].items()}
            print(f"{kind}: {group['forget']} seed {group['seed']}, {len(labels)} models", flush=True)
            mine = [dict(row, model=labels.get(row["path"], row["model"]), forget=group["forget"], seed=group["seed"])
                    for row in common.audit(kind, list(labels), group["retrain"], floor=tuple(group["floor"]),
                                           data_dir=data_dir, device=device,
                                           **(relearn_settings if kind == "relearn" else {}))]
            report.append(f"### {group['arch']}, {group['forget']}, seed {group['seed']}\n\n"
                          f"{common.audit_markdown(kind, mine, relearn_steps)}\n")
            rows += mine
        written += [out_dir / f"{kind}.md", out_dir / f"{kind}.json"]
        common.write_text(written[-2], "\n".join(report))
        common.write_text(written[-1], json.dumps(rows, indent=1))
        if kind == "relearn" and rows:
            written.append(out_dir / "relearn_curves.png")
            common.relearn_plot(rows, written[-1])
    if spec["lira"]:
        lira = spec["lira"]
        methods, ckpt = population_setup("lira", lira, root)
        result = common.lira(lira["pretrain"], methods, shadows=lira["shadows"], pool=lira["pool"], ckpt_dir=ckpt,
                            data_dir=data_dir, device=device, executor=executor)
        for audit in ("lira", "rmia"):  # one population, two attacks
            written += [out_dir / f"{audit}.md", out_dir / f"{audit}.json", out_dir / f"{audit}_roc.png"]
            common.write_lira(result, pretrain=lira["pretrain"], methods=methods, md=written[-3],
                              json_path=written[-2], plot=written[-1], audit=audit)
    if spec.get("klom"):
        klom = spec["klom"]
        methods, ckpt = population_setup("klom", klom, root)
        result = common.klom_audit(klom["pretrain"], methods, forget=klom["forget"], models=klom["models"],
                                   ckpt_dir=ckpt, data_dir=data_dir, device=device, executor=executor)
        written += [out_dir / "klom.md", out_dir / "klom.json", out_dir / "klom.png"]
        common.write_klom(result, pretrain=klom["pretrain"], forget=klom["forget"], methods=methods, md=written[-3],
                          json_path=written[-2], plot=written[-1])
    return written


def main():
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--profile", help=f"one of {', '.join([*common.PROFILES, *common.AUDIT_PROFILES])}")
    what.add_argument("--compare", metavar="P1,P2,...",
                      help="write <out-root>/compare.md: the finished profiles' rows on the forget settings and "
                           "seeds they all have, in one table; runs nothing")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the profile's methods")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the profile's)")
    parser.add_argument("--forgets", default=None,
                        help="comma-separated subset of the profile's forget settings, e.g. class3,random1200")
    parser.add_argument("--out-root", default="results", help="(default: %(default)s)")
    parser.add_argument("--data-dir", default="./data", help="(default: %(default)s)")
    parser.add_argument("--device", type=common.device_name, default="auto", help="(default: %(default)s)")
    parser.add_argument("--mia-draws", type=common.positive_int, default=None,
                        help="evaluate.py's draws of the attacks' member set (default: evaluate.py's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every run of the grid and replace results.csv instead of merging into it")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    common.add_executor_args(parser)
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild table.md and the plots from an earlier run's results.csv; runs nothing")
    args = parser.parse_args()
    executor = common.executor_from_args(args)
    if args.compare:
        main_compare(args)
    elif args.profile in common.AUDIT_PROFILES:
        main_audit_profile(args, executor)
    else:
        main_grid(args, executor)


def claim_sweep(args) -> None:
    """One sweep at a time per profile and output root: a second one refuses at once, naming the first."""
    root = Path(args.out_root)
    common.claim_file(root / args.profile / "sweep", what=f"profile {args.profile} under {root}",
                      hint="wait for it to finish, or give another --out-root")


def main_compare(args) -> None:
    """--compare: finished profiles' rows in one table."""
    rows = common.compare_rows(args.compare.split(","), Path(args.out_root),
                               args.forgets.split(",") if args.forgets else None)
    out = Path(args.out_root) / "compare.md"
    common.atomic_write(out, lambda tmp: tmp.write_text(common.summary_table(rows)))
    print(common.summary_table(rows))
    print(f"compared {args.compare}: {len(rows)} rows -> {out}")


def main_audit_profile(args, executor: common.Executor) -> None:
    """--profile of an audit profile: probe, relearn and U-LiRA on finished profiles' models."""
    if not args.dry_run:
        claim_sweep(args)
    start = time.perf_counter()
    written = run_audit_profile(args.profile, common.AUDIT_PROFILES[args.profile], Path(args.out_root),
                                args.data_dir, args.device, executor=executor, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"{args.profile}: {time.perf_counter() - start:.0f}s -> " + ", ".join(map(str, written)))


def grid_selection(args) -> tuple[dict, list[str], list[int]]:
    """The profile (cut to --forgets), methods and seeds that --profile, --forgets, --methods and --seeds name."""
    if args.profile not in common.PROFILES:
        raise common.UserError(f"unknown profile {args.profile!r}; choose one of "
                               f"{', '.join([*common.PROFILES, *common.AUDIT_PROFILES])}")
    profile = common.PROFILES[args.profile]
    if args.forgets:
        tags = [forget_tag(f) for f in profile["forgets"]]
        wanted = args.forgets.split(",")
        if not set(wanted) <= set(tags):
            raise common.UserError(f"--forgets {args.forgets}: the profile's forget settings are {', '.join(tags)}")
        profile = dict(profile, forgets=[f for f in profile["forgets"] if forget_tag(f) in wanted])
    methods = args.methods.split(",") if args.methods else profile["methods"]
    unknown = [m for m in methods if m not in common.METHODS]
    if unknown:
        raise common.UserError(f"unknown methods {unknown}; known: {', '.join(common.METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else profile["seeds"]
    except ValueError:
        raise common.UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    if any(s < 0 for s in seeds):
        raise common.UserError(f"--seeds must be non-negative, got {seeds}")
    return profile, methods, seeds


def main_grid(args, executor: common.Executor) -> None:
    """--profile of a grid profile: tune on the validation split, train, evaluate, report."""
    profile, methods, seeds = grid_selection(args)
    root = Path(args.out_root)
    tune_runs, tune_groups = plan_tuning(profile, methods, seeds, root / "ckpt")
    print(f"{args.profile}: {methods} x {[forget_tag(f) for f in profile['forgets']]} x seeds {seeds}"
          + (f"; tuning {list(dict.fromkeys(m for g in tune_groups for m, _ in g['candidates'].values()))} on the "
             "validation split first" if tune_groups else ""))
    out_dir = root / args.profile
    mia_draws = args.mia_draws or common.MIA_DRAWS
    if args.dry_run:
        defaults = {(m, kind_of(g["forget"])): common.TUNING[m][0]
                    for g in tune_groups for m, _ in g["candidates"].values()}
        runs, groups = plan(profile, methods, seeds, root / "ckpt", defaults)
        runs += [evaluation_run(g, out_dir, split="test", mia_draws=mia_draws) for g in groups]
        tune_runs = tune_runs if tune_groups else []  # without tuning they are the grid's originals
        if tune_groups:
            print("# tuning runs (then evaluate.py --split val picks each method's setting):")
        for run in tune_runs + ([dict(cmd=["# grid, shown with the first candidates:"], out=None)] if tune_groups
                                else []) + runs:
            print(common.command_line(run, executor, data_dir=args.data_dir, device=args.device) if run["out"]
                  else run["cmd"][0])
        kinds = collections.Counter(run["kind"] for run in {r["out"]: r for r in [*tune_runs, *runs]}.values())
        print(f"{sum(kinds.values())} runs (" + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
              + f"); executor {executor.kind}")
        return

    claim_sweep(args)
    start = time.perf_counter()
    log_dir = out_dir / "logs"
    run_all = functools.partial(common.run_graph, executor=executor, data_dir=args.data_dir, device=args.device,
                                log_dir=log_dir, overwrite=args.overwrite)
    if args.report_only:
        rows = common.read_rows(out_dir / "results.csv")
    else:
        # An earlier results.csv is merged into, so it is checked before any work.
        merge = (out_dir / "results.csv").exists() and not args.overwrite
        previous = common.read_rows(out_dir / "results.csv") if merge else []
        previous_selection = read_selection(out_dir / "selection.json") if merge else []
        chosen = {}
        out_dir.mkdir(parents=True, exist_ok=True)
        if tune_groups:
            # A failed candidate (e.g. a learning rate that diverges) is dropped, not fatal.
            failed = run_all(tune_runs, may_fail=lambda run: run["kind"] == "method")
            for group in tune_groups:
                for label in [label for label, out in group["methods"].items() if out in failed]:
                    del group["methods"][label], group["candidates"][label]
            evaluations = [evaluation_run(g, out_dir, split="val", mia_draws=mia_draws) for g in tune_groups]
            run_all(evaluations)
            chosen, table = select_settings(evaluation_rows(tune_groups, evaluations), tune_groups)
            table = merge_selection(previous_selection, table)
            report = selection_report(table)
            common.atomic_write(out_dir / "selection.json", lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
            common.atomic_write(out_dir / "selection.md", lambda tmp: tmp.write_text(report))
            print(report)
        runs, groups = plan(profile, methods, seeds, root / "ckpt", chosen)
        evaluations = [evaluation_run(g, out_dir, split="test", mia_draws=mia_draws) for g in groups]
        run_all(runs + evaluations)
        rows = evaluation_rows(groups, evaluations)
        rows = common.merge_rows(previous, rows)
        common.atomic_write(out_dir / "results.csv", lambda tmp: common.write_rows(tmp, rows, args.profile))
    common.atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(common.summary_table(rows)))
    written = common.plots(rows, out_dir)
    print(common.summary_table(rows))
    done = "report rebuilt from results.csv" if args.report_only else f"{len(rows)} rows"
    print(f"{args.profile}: {done}, {time.perf_counter() - start:.0f}s -> "
          + ", ".join(str(p) for p in [out_dir / "results.csv", out_dir / "table.md", *written]))


if __name__ == "__main__":
    common.run_main(main)
