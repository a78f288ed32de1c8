"""What may be compared: models of one dataset, split, architecture and forget set, with references that are
Retrains of the originals' recipe (evaluate.py and audit.py refuse anything else); the held-out data they are
scored on."""
from __future__ import annotations

import torch

from .errors import UserError
from .data import Data, data_from_spec, split_mismatch
from .outputs import sidecar_path
from .checkpoints import read_sidecar
from .recipe import RECIPE_KEYS


def check_compatible(metas: dict[str, dict]) -> dict:
    """All checkpoints share dataset, split and architecture; those with a forget set share it. Returns the spec."""
    first_path, first = next(iter(metas.items()))
    for path, meta in metas.items():
        if meta["arch"] != first["arch"]:
            raise UserError(f"{path} is a {meta['arch']} model but {first_path} a {first['arch']}: "
                                   "compare one architecture at a time")
        key = split_mismatch(meta["data"], first["data"])
        if key:
            raise UserError(f"{path} and {first_path} differ in data {key} "
                                   f"({meta['data'].get(key)} vs {first['data'].get(key)})")
    with_forget = {p: m for p, m in metas.items() if m["data"]["forget_hash"]}
    if not with_forget:
        raise UserError("no checkpoint carries a forget set: pass an unlearned model or --retrain")
    ref_path, ref = next(iter(with_forget.items()))
    for path, meta in with_forget.items():
        if meta["data"]["forget_hash"] != ref["data"]["forget_hash"]:
            raise UserError(f"{path} forgot a different set than {ref_path} "
                                   f"(forget hash {meta['data']['forget_hash']} vs {ref['data']['forget_hash']})")
    return ref["data"]


# The pretraining recipe: a Retrain is a reference only if it was trained exactly as the original was.
REFERENCE_RECIPE_KEYS = ("arch", *RECIPE_KEYS)


MISSING_RECIPE_VALUES = dict(label_smoothing=0.0)  # sidecars written before the key existed trained without it


def _recipe(meta: dict) -> dict:
    config = meta["config"]
    return {k: config.get(k, MISSING_RECIPE_VALUES.get(k)) for k in REFERENCE_RECIPE_KEYS}


def pretrained_ancestor(path: str, meta: dict) -> tuple[str, dict] | None:
    """The pretrain.py original a checkpoint descends from (following the sidecars' parent links), if on disk."""
    seen = set()
    while meta["method"] != "original":
        parent = meta.get("parent")
        if not parent or parent in seen or not sidecar_path(parent).exists():
            return None
        seen.add(parent)
        path, meta = parent, read_sidecar(parent)
    return path, meta


def starts_sparse(meta: dict) -> bool:
    """Did this model's unlearning start from a sparse (OMP/IMP) model? Then its exact reference is sparse."""
    if meta["method"] in ("omp", "imp"):
        return True
    if "source_pruned" in meta:
        return bool(meta["source_pruned"])
    parent = meta.get("parent")
    return bool(parent and sidecar_path(parent).exists()
                and read_sidecar(parent).get("pruned_modules"))


def check_references(metas: dict[str, dict], references: dict[str, str]) -> None:
    """Every reference is a Retrain (a sparse one where asked) of the originals' recipe; refuse it otherwise."""
    originals = {}
    for path, meta in metas.items():
        found = pretrained_ancestor(path, meta)
        if found:
            originals[found[0]] = found[1]
    for path, role in references.items():
        meta = metas[path]
        if meta["method"] != "retrain":
            raise UserError(f"{role} {path} is not a Retrain (its sidecar says method {meta['method']!r}); "
                                   "pass pretrain.py --retrain's output")
        sparse = bool(meta["config"].get("mask_from"))
        if sparse != (role == "--sparse-retrain"):
            raise UserError(f"{role} {path} is a {'sparse' if sparse else 'dense'} Retrain; "
                                   + ("--sparse-retrain takes pretrain.py --retrain --mask-from's output" if
                                      role == "--sparse-retrain" else "pass it as --sparse-retrain"))
        for original_path, original in originals.items():
            if _recipe(meta) != _recipe(original):
                diff = {k: (v, _recipe(original)[k]) for k, v in _recipe(meta).items() if v != _recipe(original)[k]}
                raise UserError(f"{role} {path} was trained with another recipe than {original_path} "
                                       f"(retrain vs original: {diff}): it is not this original's Retrain")


def reference_name(role: str | None, meta: dict) -> str | None:
    """A reference's row name by the flag that passed it (retrain, retrain-sparse, retrain-floor sK); None for a
    model that is not a reference."""
    if role is None:
        return None
    return {"--retrain": "retrain", "--sparse-retrain": "retrain-sparse"}.get(
        role, f"retrain-floor s{meta['config'].get('seed')}")


def checked_models(paths: list[str], references: dict[str, str], *, data_dir: str,
                   device: torch.device) -> tuple[dict[str, dict], Data]:
    """The sidecars of the references (path -> its flag) then the other paths, checked to share a dataset, split,
    architecture and forget set and the references to be Retrains of the originals' recipe; and their data."""
    ordered = list(references) + [str(p) for p in paths if str(p) not in references]
    metas = {p: read_sidecar(p) for p in ordered}
    spec = check_compatible(metas)
    check_references(metas, references)
    return metas, data_from_spec(spec, data_dir, device)


def held_out(data: Data, split: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The held-out images TA, FTA and the attacks' non-members come from: the test set, or the validation split
    (for choosing a method's settings without looking at the test set). Split into retained and forgotten classes."""
    if split == "test":
        return dict(held_retain=data.subset("test_retain"), held_forget=data.subset("test_forget"))
    x, y = data.subset("val")
    forgotten = (y == data.forget_class) if data.forget_class is not None else torch.zeros_like(y, dtype=torch.bool)
    return dict(held_retain=(x[~forgotten], y[~forgotten]), held_forget=(x[forgotten], y[forgotten]))


def describe_forget(spec: dict) -> str:
    if spec["forget_class"] is not None:
        what = f"class {spec['forget_class']}"
    else:
        what = f"{spec['forget_random']} random images (forget seed {spec['forget_seed']})"
    return f"{spec['dataset']}, forget set: {what}, {spec['forget_count']} images, hash {spec['forget_hash']}"
