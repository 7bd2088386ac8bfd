"""Resume compatibility: every checkpoint records what trained it; a resume that would change it
is refused before anything is built.

torchtitan loads the newest `step-N` of the dump folder into whatever model the config now builds:
weights the new model lacks are dropped without a word, and the optimizer's param groups (lr,
weight decay, betas) come back from the checkpoint whatever the config now says. The record
(`run_record`) is saved *inside* each checkpoint as one more stateful entry of torchtitan's
checkpointer, so it is written atomically with the weights (DCP's `.metadata` comes last), and
`check_resume` reads it back from the checkpoint a run is about to load.

A deliberate change of model-side keys is allowed by naming them in
`[checkpoint] allow_resume_changes`; optimizer hyperparameters cannot be allowed there, because
torchtitan would restore the old values anyway: start a new run from the weights instead
(`checkpoint.initial_load_path` with `checkpoint.initial_load_model_only = true`).
"""

import dataclasses
import json
import os

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.stateful import Stateful

from titan_geonorm.checks import ConfigError
from titan_geonorm.config import MODEL_RECORD_KEYS
from titan_geonorm.titan.patches import checkpoint_folders, is_complete

RECORD_KEY = "titan_geonorm_run"
OPTIMIZER_KEYS = ("optimizer.name", "optimizer.lr", "optimizer.weight_decay", "optimizer.beta1",
                  "optimizer.beta2", "optimizer.eps")


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


def check_resume(job_config) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming both values."""
    path = checkpoint_to_load(job_config)
    if path is None or path.endswith("step-0") or not is_complete(path):
        return  # fresh start, seed checkpoint (model only), or torchtitan reports the missing step
    saved = read_record(path)
    if saved is None:
        return
    allowed = set(job_config.checkpoint.allow_resume_changes)
    for key, value in run_record(job_config).items():
        if key not in saved or saved[key] == _jsonable(value) or key in allowed:
            continue
        how = (
            "torchtitan restores the optimizer's settings from the checkpoint, so the new value "
            "would be ignored: start a new run from the weights (checkpoint.initial_load_path = "
            "this step, checkpoint.initial_load_model_only = true, another job.dump_folder)"
            if key.startswith("optimizer.")
            else f'use the checkpoint\'s value, a new job.dump_folder, or checkpoint.allow_resume_changes = ["{key}"]'
        )
        raise ConfigError(
            f"{key} = {value!r}, but the checkpoint {path} was trained with {key} = {saved[key]!r}: {how}"
        )


def _jsonable(value):
    return json.loads(json.dumps(value))
