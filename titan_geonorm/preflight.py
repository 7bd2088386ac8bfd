"""Checks run on the parsed JobConfig before any process group, model or data is built.

Each failed check raises `ConfigError` naming the TOML key (or file path) at fault, so a bad
config costs seconds, not a queue slot on many nodes.
"""

import os

from torchtitan.protocols.train_spec import get_train_spec


class ConfigError(ValueError):
    pass


def _world_size(job_config) -> int:
    if job_config.comm.mode in ("fake_backend", "local_tensor"):
        return int(os.environ.get("NGPU", "1"))
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_model(job_config) -> None:
    name, flavor = job_config.model.name, job_config.model.flavor
    try:
        spec = get_train_spec(name)
    except ValueError as e:
        raise ConfigError(f"model.name = {name!r} is not a registered train spec ({e})") from None
    if flavor not in spec.model_args:
        raise ConfigError(
            f"model.flavor = {flavor!r} is not a flavor of {name!r}; "
            f"choose one of {sorted(spec.model_args)}"
        )


def check_parallelism(job_config) -> None:
    p = job_config.parallelism
    world = _world_size(job_config)
    degrees = {
        "parallelism.data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "parallelism.tensor_parallel_degree": p.tensor_parallel_degree,
        "parallelism.context_parallel_degree": p.context_parallel_degree,
        "parallelism.pipeline_parallel_degree": p.pipeline_parallel_degree,
    }
    for key, d in degrees.items():
        if d < 1:
            raise ConfigError(f"{key} = {d} must be >= 1")
    others = 1
    for d in degrees.values():
        others *= d
    shard = p.data_parallel_shard_degree
    if shard == -1:
        if world % others:
            raise ConfigError(
                f"world size {world} is not divisible by dp_replicate * tp * cp * pp = {others} "
                "(parallelism.data_parallel_shard_degree = -1 fills the rest)"
            )
    elif shard < 1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree = {shard} must be -1 or >= 1")
    elif shard * others != world:
        raise ConfigError(
            f"parallelism degrees multiply to {shard * others} "
            f"(data_parallel_shard_degree {shard} x replicate {p.data_parallel_replicate_degree} "
            f"x tensor_parallel {p.tensor_parallel_degree} x context_parallel "
            f"{p.context_parallel_degree} x pipeline_parallel {p.pipeline_parallel_degree}) "
            f"but the world size is {world}"
        )


def check_vocab(job_config) -> None:
    """The tokenizer (loaded or to be trained) must fit the flavor's embedding table."""
    vocab = get_train_spec(job_config.model.name).model_args[job_config.model.flavor].vocab_size
    path = job_config.model.hf_assets_path
    tokenizer_json = os.path.join(path or "", "tokenizer.json")
    if path and os.path.isfile(tokenizer_json):
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(tokenizer_json).get_vocab_size()
        source = f"the tokenizer in model.hf_assets_path = {path!r} has {size} tokens"
    else:
        size = job_config.training.tokenizer_vocab_size
        source = f"training.tokenizer_vocab_size = {size}"
    if size > vocab:
        raise ConfigError(
            f"{source}, more than the vocab_size {vocab} of model.flavor = "
            f"{job_config.model.flavor!r}"
        )


def check_seed_checkpoint(job_config) -> None:
    if not job_config.checkpoint.create_seed_checkpoint:
        return
    if _world_size(job_config) != 1:
        raise ConfigError(
            "checkpoint.create_seed_checkpoint needs a single process (unsharded weights); "
            f"got world size {_world_size(job_config)}"
        )
    if not job_config.checkpoint.enable:
        raise ConfigError("checkpoint.create_seed_checkpoint needs checkpoint.enable = true")


def run_preflight(job_config) -> None:
    from titan_geonorm.data import validate_data_config

    check_model(job_config)
    check_parallelism(job_config)
    check_seed_checkpoint(job_config)
    check_vocab(job_config)
    try:
        validate_data_config(job_config)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
