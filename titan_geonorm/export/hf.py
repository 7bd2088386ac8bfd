"""Write and read Hugging Face model folders.

An exported folder holds `config.json`, the weights as safetensors shards with
`model.safetensors.index.json` (written even for one shard: torchtitan's HF loading and
transformers both read it), the tokenizer files, `generation_config.json`, and for the `custom`
target `modeling_titan_geonorm.py` named by `auto_map` in `config.json`. `config.json` names the
class in `architectures`, as `save_pretrained` writes it: serving engines (vLLM, SGLang, TGI) pick
the model class from it, not from `model_type`.

A folder is written whole into a temporary sibling `.NAME.partial-*` and renamed into place
(`atomic_folder`), so readers never see a half-written or mixed folder: an existing non-empty
folder is refused unless `overwrite`, which replaces it whole. After a hard kill (SIGKILL, power
loss) the target is untouched and the hidden sibling may remain; it is safe to delete.
"""

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file
from torchtitan.models.llama3.model.args import TransformerModelArgs
from transformers import GenerationConfig, Glm4Config, LlamaConfig, PretrainedConfig

from titan_geonorm.export import modeling_titan_geonorm
from titan_geonorm.export.mapping import Target, block_of, geonorm_config, norm_type_of
from titan_geonorm.export.modeling_titan_geonorm import TitanGeoNormConfig

MODELING_FILE = Path(modeling_titan_geonorm.__file__)
AUTO_MAP = {
    "AutoConfig": "modeling_titan_geonorm.TitanGeoNormConfig",
    "AutoModelForCausalLM": "modeling_titan_geonorm.TitanGeoNormForCausalLM",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = {"llama": Target.LLAMA, "glm4": Target.GLM4, "titan_geonorm": Target.CUSTOM}
ARCHITECTURES = {
    Target.LLAMA: "LlamaForCausalLM",
    Target.GLM4: "Glm4ForCausalLM",
    Target.CUSTOM: "TitanGeoNormForCausalLM",
}
"""The class each target loads as; Llama and Glm4 are served natively by vLLM-class engines."""


def _max_positions(args: TransformerModelArgs) -> int:
    """The context the RoPE scaling is built for (factor x original context), as Llama 3.1 states
    it. torchtitan applies the scaling whatever the training length; transformers expects
    max_position_embeddings above the original context of a llama3 scaling (it warns otherwise)."""
    scaling = args.rope_scaling_args
    scaled = int(scaling.scaling_factor * scaling.original_max_position_embeddings)
    return max(args.max_seq_len, scaled)


def _shape_kwargs(args: TransformerModelArgs, intermediate_size: int, bos_id, eos_id, dtype) -> dict:
    n_kv_heads = args.n_kv_heads or args.n_heads
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=intermediate_size,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=_max_positions(args),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=False,
        dtype=dtype,
    )


def _llama3_rope(args: TransformerModelArgs, **extra) -> dict:
    """torchtitan always applies llama3 RoPE scaling (`RoPEScalingArgs`); say so explicitly."""
    scaling = args.rope_scaling_args
    return dict(
        rope_type="llama3",
        rope_theta=float(args.rope_theta),
        factor=float(scaling.scaling_factor),
        low_freq_factor=float(scaling.low_freq_factor),
        high_freq_factor=float(scaling.high_freq_factor),
        original_max_position_embeddings=int(scaling.original_max_position_embeddings),
        **extra,
    )


def hf_config(
    target: Target,
    args: TransformerModelArgs,
    intermediate_size: int,
    bos_id: int | None,
    eos_id: int | None,
    dtype: torch.dtype,
) -> PretrainedConfig:
    """The config of the target class describing exactly the training model `args`."""
    common = _shape_kwargs(args, intermediate_size, bos_id, eos_id, dtype)
    head_dim = args.dim // args.n_heads
    common["architectures"] = [ARCHITECTURES[target]]
    if target == Target.LLAMA:
        return LlamaConfig(
            **common,
            head_dim=head_dim,
            hidden_act="silu",
            rms_norm_eps=args.norm_eps,
            rope_parameters=_llama3_rope(args),
            attention_bias=False,
            mlp_bias=False,
        )
    if target == Target.GLM4:
        return Glm4Config(
            **common,
            head_dim=head_dim,
            hidden_act="silu",
            rms_norm_eps=args.norm_eps,
            rope_parameters=_llama3_rope(args, partial_rotary_factor=1.0),
            partial_rotary_factor=1.0,
            attention_bias=False,
            pad_token_id=None,
        )
    scaling = args.rope_scaling_args
    config = TitanGeoNormConfig(
        **common,
        norm_eps=args.norm_eps,
        rope_theta=float(args.rope_theta),
        rope_scaling_factor=float(scaling.scaling_factor),
        rope_low_freq_factor=float(scaling.low_freq_factor),
        rope_high_freq_factor=float(scaling.high_freq_factor),
        rope_original_max_position_embeddings=int(scaling.original_max_position_embeddings),
        block=block_of(args),
        norm_type=norm_type_of(args),
        norm_bias=bool(getattr(args, "norm_bias", False)),
        embedding_norm=bool(getattr(args, "embedding_norm", False)),
        **geonorm_config(args),
    )
    config.auto_map = dict(AUTO_MAP)
    return config


def write_weights(state_dict: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> None:
    """safetensors shards of at most `max_shard_size` plus the index (tensor -> file)."""
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state_dict[name].contiguous() for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": split.metadata["total_size"]},
        "weight_map": dict(sorted(split.tensor_to_filename.items())),
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(tokenizer_dir: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, folder / name)


def check_output(folder: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an output that is a file, is or holds one of `inputs` (replacing it would delete the
    source), or holds anything unless `overwrite`."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is a file, not a folder")
    resolved = folder.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if source == resolved or resolved in source.parents:
            raise ValueError(f"--output {folder} is or holds the input {source}: write elsewhere")
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if names and not overwrite:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"--output {folder} is not empty ({len(names)} entries: {shown}): choose an empty or "
            "new folder, or pass --overwrite to replace the folder whole"
        )


def _replace_folder(new: Path, folder: Path) -> None:
    """Move `new` to `folder`. rename(2) replaces an empty directory atomically; a full one is
    first moved aside, so that a failure between the two renames can put it back."""
    if not (folder.is_dir() and any(folder.iterdir())):
        os.replace(new, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{secrets.token_hex(4)}")
    os.rename(folder, old)
    try:
        os.rename(new, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    shutil.rmtree(old)


@contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """A fresh temporary folder beside `folder` to write into; when the block ends without error it
    replaces `folder` (see `check_output` for what is refused), on any error it is deleted and
    `folder` is left as it was."""
    folder, inputs = Path(folder), list(inputs)
    check_output(folder, overwrite, inputs)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder keeps the umask's permissions instead of mkdtemp's 0700.
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        # Another process may have written there while this one worked.
        check_output(folder, overwrite, inputs)
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_hf_folder(
    folder: Path,
    target: Target,
    config: PretrainedConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer_dir: Path,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write the folder's files into the existing folder `folder` (see `atomic_folder`);
    `state_dict` is already in the target's names and dtype."""
    config.save_pretrained(str(folder))
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id,
    ).save_pretrained(str(folder))
    write_weights(state_dict, folder, max_shard_size)
    copy_tokenizer(tokenizer_dir, folder)
    if target == Target.CUSTOM:
        shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)


def read_hf_config(folder: Path) -> tuple[Target, dict]:
    """(target, config.json) of an exported folder; refuses model types this package did not write."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = json.loads(config_file.read_text())
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{config_file}: model_type {model_type!r} is not one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type], config


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files (through the index when there is one)."""
    index = folder / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"{folder} holds no safetensors weights")
    state_dict = {}
    for name in files:
        state_dict.update(load_file(str(folder / name)))
    return state_dict
