"""Export trained checkpoints to Hugging Face folders, and import Hugging Face folders back to DCP.

    python -m titan_geonorm.export --config X.toml --checkpoint <run>/checkpoint/step-N --output DIR
    python -m titan_geonorm.export --to-dcp --config X.toml --checkpoint HF_DIR --output DCP_DIR

Pre-LN + RMSNorm exports as `LlamaForCausalLM`, Peri-LN + RMSNorm without embedding norm as
`Glm4ForCausalLM`, every other variant with the shipped `modeling_titan_geonorm.py`
(`trust_remote_code=True`); see `mapping.py`. Import is the exact inverse of export.

Both directions write their output folder atomically and refuse a non-empty one unless
`overwrite` (see `hf.atomic_folder`), checked before any weight is read.
"""

from pathlib import Path

import torch

from titan_geonorm.titan.patches import apply_cpu_patches

# The export reads configs and builds models through torchtitan, which fixes its device type at
# its first import (below): on a CPU-only host the CPU patches must come first.
apply_cpu_patches()

from titan_geonorm.export.hf import (  # noqa: E402
    atomic_folder,
    check_output,
    hf_config,
    read_hf_config,
    read_weights,
    write_hf_folder,
)
from titan_geonorm.export.load import (  # noqa: E402
    build_model_args,
    check_state_dict,
    check_trained_as,
    load_checkpoint,
    load_job_config,
    model_shapes,
    save_checkpoint,
    tokenizer_folder,
)
from titan_geonorm.export.mapping import Target, block_of, from_hf, select_target, to_hf  # noqa: E402

__all__ = ["DTYPES", "Target", "export_checkpoint", "export_state_dict", "import_state_dict", "import_to_dcp"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# config.json entries that must equal the configured model's on import (shapes alone miss them).
_CHECKED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "norm_eps",
    "rope_parameters",
    "rope_theta",
    "block",
    "norm_type",
    "norm_bias",
    "embedding_norm",
)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _special_ids(tokenizer_dir: Path) -> tuple[int | None, int | None]:
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tokenizer = HuggingFaceTokenizer(str(tokenizer_dir))
    return tokenizer.bos_id, tokenizer.eos_id


def _intermediate_size(shapes: dict) -> int:
    return shapes["layers.0.feed_forward.w1.weight"][0]


def export_state_dict(
    state_dict: dict[str, torch.Tensor],
    args,
    output: str | Path,
    tokenizer_dir: str | Path,
    dtype: str = "float32",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    inputs: list[Path] = (),
) -> Target:
    """Write the HF folder of a training-model state dict (full tensors) with model args `args`;
    `inputs` are folders the output must not be or contain (besides `tokenizer_dir`)."""
    torch_dtype = _torch_dtype(dtype)
    inputs = [Path(tokenizer_dir), *inputs]
    check_output(Path(output), overwrite, inputs)
    target = select_target(args)
    cast = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    bos_id, eos_id = _special_ids(Path(tokenizer_dir))
    shapes = {k: v.shape for k, v in state_dict.items()}
    config = hf_config(target, args, _intermediate_size(shapes), bos_id, eos_id, torch_dtype)
    with atomic_folder(output, overwrite, inputs) as folder:
        write_hf_folder(folder, target, config, to_hf(target, cast, args), Path(tokenizer_dir), max_shard_size)
    return target


def export_checkpoint(
    config_file: str | Path,
    checkpoint: str | Path,
    output: str | Path,
    dtype: str = "float32",
    overrides: list[str] = (),
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Target:
    """Export the DCP checkpoint folder `checkpoint` of a run configured by `config_file`."""
    _torch_dtype(dtype)
    check_output(Path(output), overwrite, [Path(checkpoint)])
    job_config = load_job_config(config_file, overrides)
    check_trained_as(job_config, checkpoint)
    model_cls, args = build_model_args(job_config)
    block_of(args)
    state_dict = load_checkpoint(checkpoint, model_shapes(model_cls, args))
    tokenizer_dir = tokenizer_folder(job_config, checkpoint)
    return export_state_dict(
        state_dict, args, output, tokenizer_dir, dtype, max_shard_size, overwrite, [Path(checkpoint)]
    )


def _check_config(found: dict, expected: dict, folder: Path) -> None:
    # Every [geonorm] key (mapping.geonorm_config): same weights under another mode are another model.
    for key in (*_CHECKED_CONFIG_KEYS, *(k for k in expected if k.startswith("geonorm_"))):
        if key in expected and found.get(key) != expected[key]:
            raise ValueError(
                f"{folder}/config.json: {key} = {found.get(key)!r} but the configured model has "
                f"{expected[key]!r}: wrong [model] name/flavor or options?"
            )


def import_state_dict(hf_folder: str | Path, model_cls, args) -> dict[str, torch.Tensor]:
    """The training-model state dict (fp32) of an exported HF folder, checked against `args`:
    same target class, same config entries, same weight names and shapes."""
    hf_folder = Path(hf_folder)
    target, found = read_hf_config(hf_folder)
    if target != select_target(args):
        raise ValueError(
            f"{hf_folder} holds a {found['model_type']!r} model but the configured model "
            f"(block {block_of(args)!r}, norm_type {getattr(args, 'norm_type', 'rmsnorm')!r}) "
            f"exports as {select_target(args).value!r}"
        )
    shapes = model_shapes(model_cls, args)
    expected = hf_config(target, args, _intermediate_size(shapes), None, None, torch.float32)
    _check_config(found, expected.to_dict(), hf_folder)
    state_dict = from_hf(target, read_weights(hf_folder), args)
    check_state_dict(shapes, {k: v.shape for k, v in state_dict.items()}, f"Hugging Face folder {hf_folder}")
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def import_to_dcp(
    config_file: str | Path,
    hf_folder: str | Path,
    output: str | Path,
    overrides: list[str] = (),
    overwrite: bool = False,
) -> Target:
    """Convert an exported HF folder back to a model-only DCP checkpoint of the configured model
    (fp32 weights), loadable by torchtitan with `--checkpoint.initial_load_path OUTPUT
    --checkpoint.initial_load_model_only`."""
    check_output(Path(output), overwrite, [Path(hf_folder)])
    job_config = load_job_config(config_file, overrides)
    model_cls, args = build_model_args(job_config)
    state_dict = import_state_dict(hf_folder, model_cls, args)
    with atomic_folder(output, overwrite, [Path(hf_folder)]) as folder:
        save_checkpoint(state_dict, folder)
    return select_target(args)
