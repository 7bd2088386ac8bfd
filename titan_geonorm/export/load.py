"""Read a training run back: its job config, its model, a DCP checkpoint's weights, its tokenizer.

A torchtitan checkpoint folder (`<dump_folder>/checkpoint/step-N`) stores the model's weights under
their plain names (`tok_embeddings.weight`, ...) next to `optimizer.*`, `lr_scheduler.*`,
`dataloader.*` and `train_state.*` entries. DCP reassembles full tensors from the shards of any
world size, so a checkpoint saved by FSDP/TP on N ranks loads here into one process without a
process group (`no_dist`).
"""

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan_geonorm.titan.patches import checkpoint_damage

NON_MODEL_PREFIXES = ("optimizer.", "lr_scheduler.", "dataloader.", "train_state.")


@contextmanager
def _single_process():
    """DCP warns that it assumes one process when no process group exists: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_job_config(config_file: str | Path, overrides: list[str] = ()):
    """The job config of `config_file` with `--section.key value` overrides, as the trainer sees it."""
    from titan_geonorm.titan.launcher import parse_config  # CPU patches, train specs

    return parse_config(["--job.config_file", str(config_file), *overrides])


def build_model_args(job_config):
    """(model class, model args) of the config's `[model] name` and `flavor`, updated from the config."""
    from torchtitan.protocols.train_spec import get_train_spec

    from titan_geonorm.titan.preflight import check_model, check_sections

    check_model(job_config)
    check_sections(job_config)
    spec = get_train_spec(job_config.model.name)
    args = copy.deepcopy(spec.model_args[job_config.model.flavor])
    args.update_from_config(job_config)
    return spec.model_cls, args


def model_shapes(model_cls, args) -> dict[str, torch.Size]:
    """Name -> shape of every weight of the model (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = model_cls(args)
    return {name: t.shape for name, t in model.state_dict().items()}


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Size], source: str) -> None:
    """Raise ValueError naming the first weight missing from, unexpected in or of another shape in
    `found` than the model described by the config."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise ValueError(
            f"{source} lacks weight {missing[0]!r} of the configured model "
            f"({len(missing)} missing): wrong [model] name/flavor or options?"
        )
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise ValueError(
            f"{source} has weight {unexpected[0]!r} that the configured model lacks "
            f"({len(unexpected)} unexpected): wrong [model] name/flavor or options?"
        )
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ValueError(
                f"{source}: weight {key!r} has shape {tuple(found[key])}, the configured "
                f"model expects {tuple(shape)}: wrong [model] flavor?"
            )


def check_trained_as(job_config, path: str | Path) -> None:
    """Refuse a DCP checkpoint whose run record (`titan.resume`) names another model, flavor, norm
    or variant setting than `job_config`, naming both values; one without a record (seed,
    model-only or imported checkpoint) or without `.metadata` (reported by the load) passes."""
    from titan_geonorm.titan.resume import check_export

    if (Path(path) / ".metadata").is_file():
        with _single_process():
            check_export(job_config, str(path))


def checkpoint_tensors(path: str | Path) -> dict[str, TensorStorageMetadata]:
    """The model entries (name -> metadata) of a DCP checkpoint folder."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(
            f"{path} is not a DCP checkpoint (no .metadata): pass a step folder such as <dump_folder>/checkpoint/step-N"
        )
    damage = checkpoint_damage(str(path))
    if damage is not None:
        raise ValueError(f"checkpoint {path}: {damage[0]} {damage[1]}: export another step")
    metadata = FileSystemReader(str(path)).read_metadata()
    return {
        key: meta
        for key, meta in metadata.state_dict_metadata.items()
        if not key.startswith(NON_MODEL_PREFIXES) and isinstance(meta, TensorStorageMetadata)
    }


def load_checkpoint(path: str | Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the model weights in `path`, in their stored dtype, checked against
    `expected` (see `check_state_dict`)."""
    entries = checkpoint_tensors(path)
    check_state_dict(expected, {k: m.size for k, m in entries.items()}, f"checkpoint {path}")
    state_dict = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()}
    with _single_process():
        dcp.load(state_dict, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return state_dict


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write model weights as a DCP checkpoint that torchtitan loads (model-only, e.g. as
    `--checkpoint.initial_load_path` with `--checkpoint.initial_load_model_only`)."""
    with _single_process():
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)


def tokenizer_folder(job_config, checkpoint: str | Path) -> Path:
    """Where the run's tokenizer is: `[model] hf_assets_path` if it holds one (the trainer loads it
    from there), else the run folder the checkpoint sits in (`<run>/checkpoint/step-N` ->
    `<run>/tokenizer`), else `<dump_folder>/tokenizer` of the config."""
    from titan_geonorm.data.tokenizer import has_tokenizer

    assets = job_config.model.hf_assets_path
    candidates = [Path(assets)] if assets else []
    candidates += [
        Path(checkpoint).resolve().parent.parent / "tokenizer",
        Path(job_config.job.dump_folder) / "tokenizer",
    ]
    for folder in candidates:
        if has_tokenizer(folder):
            return folder
    raise FileNotFoundError(
        f"no tokenizer for checkpoint {checkpoint}: looked in {[str(c) for c in candidates]}; "
        "set model.hf_assets_path to the run's tokenizer folder"
    )
