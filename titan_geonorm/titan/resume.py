"""Resume compatibility: every checkpoint records what trained it; a resume that would change it
is refused before anything is built.

torchtitan loads the newest `step-N` of the dump folder into whatever model the config now builds:
weights the new model lacks are dropped without a word, and the optimizer's param groups (lr,
weight decay, betas) come back from the checkpoint whatever the config now says. The record
(`run_record`) is saved *inside* each checkpoint as one more stateful entry of torchtitan's
checkpointer, so it is written atomically with the weights (DCP's `.metadata` comes last), and
`check_resume` reads it back from the checkpoint a run is about to load.

A deliberate change is allowed by naming its key in `[checkpoint] allow_resume_changes`: model
and variant keys, and `optimizer.lr` / `optimizer.weight_decay`, whose new values
`apply_optimizer_changes` writes into the param groups (and the LR schedulers' peak) after the
checkpoint restored the old ones. The other optimizer keys (its name, betas, eps, Manifold Muon
routing) shape the saved optimizer state and cannot change on resume: start a new run from the
weights instead (`checkpoint.initial_load_path` with `checkpoint.initial_load_model_only = true`).

Before any of that, `check_checkpoint_files` makes sure the step about to be loaded is whole
(`patches.checkpoint_damage`): a truncated shard or `.metadata` is refused by name.
"""

import dataclasses
import json
import os

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.stateful import Stateful

from titan_geonorm.checks import ConfigError
from titan_geonorm.config import MODEL_RECORD_KEYS, OPTIMIZER_RESUMABLE
from titan_geonorm.titan.patches import checkpoint_damage, checkpoint_folders

RECORD_KEY = "titan_geonorm_run"
OPTIMIZER_KEYS = (
    "optimizer.name",
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.beta1",
    "optimizer.beta2",
    "optimizer.eps",
)


class CheckpointDamaged(ConfigError):
    """The checkpoint a run would resume from has a missing or truncated file."""


def run_record(job_config) -> dict[str, object]:
    """The settings a checkpoint cannot be resumed without, as `section.key -> value`."""
    m, o = job_config.model, job_config.optimizer
    record = {key: getattr(m, key.split(".", 1)[1]) for key in MODEL_RECORD_KEYS}
    record.update({key: getattr(o, key.split(".", 1)[1]) for key in OPTIMIZER_KEYS})
    for section in ("geonorm", "peri_ln"):
        for f in dataclasses.fields(getattr(job_config, section)):
            record[f"{section}.{f.name}"] = getattr(getattr(job_config, section), f.name)
    if o.name == "ManifoldMuon":
        mm = o.manifold_muon
        record["optimizer.manifold_muon.preset"] = mm.preset
        record["optimizer.manifold_muon.rules"] = list(mm.rules)
    return record


class RunRecord(Stateful):
    """The record as a torchtitan checkpoint state (a JSON string in the DCP checkpoint)."""

    def __init__(self, job_config) -> None:
        self.record = run_record(job_config)

    def state_dict(self) -> dict[str, str]:
        return {"json": json.dumps(self.record, sort_keys=True)}

    def load_state_dict(self, state_dict: dict[str, str]) -> None:
        """Nothing to restore: `check_resume` compared the record before the run was built."""


def checkpoint_to_load(job_config) -> str | None:
    """The `step-N` folder torchtitan will resume from (its rule: `load_step`, else the newest
    complete one), or None for a fresh start."""
    c = job_config.checkpoint
    folder = os.path.join(job_config.job.dump_folder, c.folder)
    if not c.enable or not os.path.isdir(folder):
        return None
    if c.load_step != -1:
        return os.path.join(folder, f"step-{c.load_step}")
    complete = [path for _, path, done in checkpoint_folders(folder) if done]
    return complete[-1] if complete else None


def read_record(path: str) -> dict[str, object] | None:
    """The record saved in the DCP checkpoint at `path`; None if it holds none (a seed or
    model-only checkpoint, or one written before records existed)."""
    state = {RECORD_KEY: {"json": ""}}
    dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
    return json.loads(state[RECORD_KEY]["json"]) if state[RECORD_KEY]["json"] else None


def mismatches(job_config, saved: dict[str, object], optimizer: bool = True) -> list[tuple[str, object, object]]:
    """(key, configured value, recorded value) of every recorded setting the config changes;
    `optimizer = False` leaves out the optimizer's (an export has none)."""
    found = []
    for key, value in run_record(job_config).items():
        if key not in saved or saved[key] == _jsonable(value):
            continue
        if optimizer or not key.startswith("optimizer."):
            found.append((key, value, saved[key]))
    return found


def check_checkpoint_files(path: str) -> None:
    """Refuse a checkpoint folder with a missing or truncated file, naming it (before any compute:
    torchtitan would fail inside the load with a bare EOFError or unpickling error)."""
    damage = checkpoint_damage(path)
    if damage is None:
        return
    name, problem = damage
    folder = os.path.dirname(path)
    earlier = [p for _, p, done in checkpoint_folders(folder) if done and p != path] if os.path.isdir(folder) else []
    previous = f" ({os.path.basename(earlier[-1])})" if earlier else ""
    raise CheckpointDamaged(
        f"checkpoint {path}: {name} {problem}; delete the folder to resume from the previous "
        f"step{previous}, or set checkpoint.load_step"
    )


def check_resume(job_config) -> None:
    """Refuse a resume from a damaged checkpoint, or whose settings differ from the checkpoint's
    (naming both values) unless `checkpoint.allow_resume_changes` lists the key."""
    path = checkpoint_to_load(job_config)
    if path is None or not os.path.isdir(path):
        return  # fresh start, or torchtitan reports the missing `load_step`
    check_checkpoint_files(path)
    if path.endswith("step-0"):
        return  # seed checkpoint: model only, no record
    saved = read_record(path)
    if saved is None:
        return
    allowed = set(job_config.checkpoint.allow_resume_changes)
    for key, value, old in mismatches(job_config, saved):
        if key in allowed:
            continue
        if key in OPTIMIZER_RESUMABLE:
            how = (
                f'use the checkpoint\'s value, or checkpoint.allow_resume_changes = ["{key}"] to '
                "apply the new one from this step on"
            )
        elif key.startswith("optimizer."):
            how = (
                f"{key} cannot change on resume (the saved optimizer state belongs to the old "
                "setting): start a new run from the weights (checkpoint.initial_load_path = "
                "this step, checkpoint.initial_load_model_only = true, another job.dump_folder)"
            )
        else:
            how = f'use the checkpoint\'s value, a new job.dump_folder, or checkpoint.allow_resume_changes = ["{key}"]'
        raise ConfigError(f"{key} = {value!r}, but the checkpoint {path} was trained with {key} = {old!r}: {how}")


def check_export(job_config, path: str) -> None:
    """Refuse to export the checkpoint at `path` as a model other than the one it trained: the
    weights would be read into another architecture (e.g. RMSNorm gains as LayerNorm's)."""
    found = mismatches(job_config, read_record(path) or {}, optimizer=False)
    if found:
        key, value, old = found[0]
        raise ConfigError(
            f"{key} = {value!r}, but the checkpoint {path} was trained with {key} = "
            f"{old!r}: export with the checkpoint's value (its training config)"
        )


def optimizer_settings(optimizers) -> list[list[dict[str, float]]]:
    """Per optimizer and param group, the configured peak lr and weight decay (as the builder and
    the LR schedulers set them), to be taken before a checkpoint load overwrites them."""
    return [[{"lr": g["initial_lr"], "weight_decay": g["weight_decay"]} for g in o.param_groups] for o in optimizers]


def apply_optimizer_changes(job_config, optimizers, lr_schedulers, settings) -> None:
    """Put back the configured values of the `optimizer.lr` / `optimizer.weight_decay` that
    `checkpoint.allow_resume_changes` lists, after a load restored the checkpoint's: the param
    groups get them, and the LR schedulers take the new lr as their peak, so the schedule goes on
    at the same step with the new scale."""
    keys = [k.split(".", 1)[1] for k in OPTIMIZER_RESUMABLE if k in job_config.checkpoint.allow_resume_changes]
    if not keys:
        return
    for optimizer, scheduler, groups in zip(optimizers, lr_schedulers, settings, strict=True):
        for group, configured in zip(optimizer.param_groups, groups, strict=True):
            if "weight_decay" in keys:
                group["weight_decay"] = configured["weight_decay"]
            if "lr" in keys:
                group["initial_lr"] = configured["lr"]
        if "lr" in keys:
            scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
            for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _jsonable(value):
    return json.loads(json.dumps(value))
