"""Checks run on the parsed JobConfig before any process group, model or data is built.

Each failed check raises `ConfigError` naming the TOML key (or file path) at fault, so a bad
config costs seconds, not a queue slot on many nodes. Every plugin section checks its own values
(`validate()`, called once here by `check_sections`); this module holds the type check of every
key and the checks that span sections (parallelism x variant x optimizer x torch version), each
once.
"""

import copy
import dataclasses
import math
import os
import types
import typing

import torch
from torchtitan.protocols.train_spec import get_train_spec

from titan_geonorm.checks import ConfigError, require
from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.titan.resume import check_resume

OPTIMIZERS = ("Adam", "AdamW", "ManifoldMuon")
# torch versions on which TP + torch.compile was seen failing on CPU (DESIGN.md section 2).
_COMPILE_TP_BROKEN_ON_CPU = ("2.13.",)


def _world_size(job_config) -> int:
    if job_config.comm.mode in ("fake_backend", "local_tensor"):
        return int(os.environ.get("NGPU", "1"))
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_model(job_config) -> None:
    name, flavor = job_config.model.name, job_config.model.flavor
    try:
        spec = get_train_spec(name)
    except ValueError as e:
        raise ConfigError(f"model.name = {name!r}: not a registered train spec ({e})") from None
    if flavor not in spec.model_args:
        raise ConfigError(
            f"model.flavor = {flavor!r}: not a flavor of model.name = {name!r}; choose one of {sorted(spec.model_args)}"
        )


def _world_size_origin(job_config) -> str:
    """Where the world size comes from, for messages."""
    if job_config.comm.mode in ("fake_backend", "local_tensor"):
        return f"NGPU, comm.mode = {job_config.comm.mode!r}"
    return "WORLD_SIZE: torchrun --nnodes x --nproc-per-node"


def _world_size_source(job_config) -> str:
    return f"the world size {_world_size(job_config)} ({_world_size_origin(job_config)})"


def check_parallelism(job_config) -> None:
    p = job_config.parallelism
    degrees = {
        "parallelism.data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "parallelism.tensor_parallel_degree": p.tensor_parallel_degree,
        "parallelism.context_parallel_degree": p.context_parallel_degree,
        "parallelism.pipeline_parallel_degree": p.pipeline_parallel_degree,
    }
    for key, d in degrees.items():
        require(d >= 1, key, d, "must be >= 1")
    others = math.prod(degrees.values())
    product = " x ".join(f"{key} = {d}" for key, d in degrees.items())
    world, shard = _world_size(job_config), p.data_parallel_shard_degree
    if shard == -1:
        if world % others:
            raise ConfigError(
                f"the world size {world} ({_world_size_origin(job_config)}) is not divisible by "
                f"{product} (= {others}); parallelism.data_parallel_shard_degree = -1 fills the rest"
            )
    elif shard < 1:
        raise ConfigError(f"parallelism.data_parallel_shard_degree = {shard}: must be -1 or >= 1")
    elif shard * others != world:
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree = {shard} x {product} = {shard * others}, "
            f"but the world size is {world} ({_world_size_origin(job_config)})"
        )


def check_vocab(job_config) -> None:
    """The tokenizer (loaded or to be trained) must fit the flavor's embedding table."""
    vocab = get_train_spec(job_config.model.name).model_args[job_config.model.flavor].vocab_size
    path = job_config.model.hf_assets_path
    if path and not os.path.isdir(path):
        raise ConfigError(f"model.hf_assets_path = {path!r}: not a folder")
    tokenizer_json = os.path.join(path or "", "tokenizer.json")
    if path and os.path.isfile(tokenizer_json):
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(tokenizer_json).get_vocab_size()
        source = f"the tokenizer in model.hf_assets_path = {path!r} has {size} tokens"
    else:
        size = job_config.training.tokenizer_vocab_size
        source = f"training.tokenizer_vocab_size = {size}"
    if size > vocab:
        raise ConfigError(f"{source}, more than the vocab_size {vocab} of model.flavor = {job_config.model.flavor!r}")


def check_stock_model_keys(job_config) -> None:
    """torchtitan's own llama3 (no block variant) has RMSNorm only: refuse keys it would ignore."""
    args = get_train_spec(job_config.model.name).model_args[job_config.model.flavor]
    if hasattr(args, "block"):
        return
    m = job_config.model
    for key, value, default in (("norm_type", m.norm_type, "rmsnorm"), ("norm_bias", m.norm_bias, False)):
        require(
            value == default,
            f"model.{key}",
            value,
            f"model.name = {m.name!r} (torchtitan's llama3) has RMSNorm without bias only; "
            "use llama3_preln for the same model with another norm",
        )


def check_seed_checkpoint(job_config) -> None:
    if not job_config.checkpoint.create_seed_checkpoint:
        return
    if _world_size(job_config) != 1:
        raise ConfigError(
            "checkpoint.create_seed_checkpoint = true needs a single process (unsharded weights), "
            f"not {_world_size_source(job_config)}"
        )
    if not job_config.checkpoint.enable:
        raise ConfigError("checkpoint.create_seed_checkpoint = true needs checkpoint.enable = true")


def run_preflight(job_config) -> None:
    from titan_geonorm.data.datasets import validate_data_config

    check_types(job_config)
    check_model(job_config)
    check_stock_model_keys(job_config)
    check_ranges(job_config)
    check_sections(job_config)
    check_parallelism(job_config)
    check_combinations(job_config)
    check_seed_checkpoint(job_config)
    check_geometry_routing(job_config)
    check_vocab(job_config)
    check_resume(job_config)
    try:
        validate_data_config(job_config)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_value(key: str, value, annotation) -> None:
    """Raise ConfigError unless `value` fits `annotation` (int, float, bool, str, Literal,
    unions, list[...]); TOML values are not type-checked by torchtitan's config parser."""
    if _fits(value, annotation):
        return
    if typing.get_origin(annotation) is typing.Literal:
        raise ConfigError(f"{key} = {value!r}: expected one of {typing.get_args(annotation)}")
    raise ConfigError(f"{key} = {value!r}: expected a value of type {_type_name(annotation)}")


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _fits(value, annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return True
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_types(job_config, prefix: str = "") -> None:
    """Every key of every section (torchtitan's and the plugin's) has its declared type."""
    for f in dataclasses.fields(job_config):
        value = getattr(job_config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_types(value, key + ".")
        else:
            _check_value(key, value, f.type)


def check_ranges(job_config) -> None:
    """Ranges of the numeric keys torchtitan would otherwise trip over mid-build (or never)."""
    t, o, s = job_config.training, job_config.optimizer, job_config.lr_scheduler
    for key, value in (
        ("training.steps", t.steps),
        ("training.local_batch_size", t.local_batch_size),
        ("training.seq_len", t.seq_len),
        ("metrics.log_freq", job_config.metrics.log_freq),
    ):
        require(value >= 1, key, value, "must be >= 1")
    require(
        t.global_batch_size == -1 or t.global_batch_size >= 1,
        "training.global_batch_size",
        t.global_batch_size,
        "must be -1 (local_batch_size x data-parallel degree) or >= 1",
    )
    finite = math.isfinite
    require(finite(t.max_norm) and t.max_norm > 0, "training.max_norm", t.max_norm, "must be a finite number > 0")
    require(finite(o.lr) and o.lr >= 0, "optimizer.lr", o.lr, "must be a finite number >= 0")
    require(finite(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "must be a finite number > 0")
    require(
        finite(o.weight_decay) and o.weight_decay >= 0,
        "optimizer.weight_decay",
        o.weight_decay,
        "must be a finite number >= 0",
    )
    for key in ("beta1", "beta2"):
        value = getattr(o, key)
        require(0 <= value < 1, f"optimizer.{key}", value, "must be in [0, 1)")
    require(o.name in OPTIMIZERS, "optimizer.name", o.name, f"expected one of {OPTIMIZERS}")
    require(s.warmup_steps >= 0, "lr_scheduler.warmup_steps", s.warmup_steps, "must be >= 0")
    require(0 <= s.min_lr_factor <= 1, "lr_scheduler.min_lr_factor", s.min_lr_factor, "must be in [0, 1]")
    require(
        s.decay_ratio is None or 0 <= s.decay_ratio <= 1,
        "lr_scheduler.decay_ratio",
        s.decay_ratio,
        "must be in [0, 1] or unset",
    )
    c = job_config.checkpoint
    if c.enable:
        require(c.interval >= 1, "checkpoint.interval", c.interval, "must be >= 1")
        require(
            c.keep_latest_k == 0 or c.keep_latest_k >= 2,
            "checkpoint.keep_latest_k",
            c.keep_latest_k,
            "must be 0 (keep all) or >= 2 (the newest may be mid-save)",
        )
    v = job_config.validation
    # Checked whether or not validation is enabled: torchtitan asserts on them when building.
    require(v.freq >= 1, "validation.freq", v.freq, "must be >= 1")
    require(v.steps == -1 or v.steps >= 1, "validation.steps", v.steps, "must be -1 or >= 1")


def plugin_sections(job_config) -> list[tuple[object, type]]:
    """(section value, its plugin class) for every plugin section with a `validate()`.

    torchtitan merges `[model]`, `[training]`, ... with the plugin's fields into new dataclasses
    that keep the fields but not the methods, so each class's `validate` is applied to the merged
    section as a plain function.
    """
    from titan_geonorm.config import JobConfig

    pairs = [(getattr(job_config, f.name), f.type) for f in dataclasses.fields(JobConfig)]
    pairs.append((job_config.optimizer.manifold_muon, ManifoldMuonConfig))
    return [(value, cls) for value, cls in pairs if hasattr(cls, "validate")]


def check_sections(job_config) -> None:
    """Every plugin section's own checks, once each."""
    for value, cls in plugin_sections(job_config):
        try:
            cls.validate(value)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _dp_degree(job_config) -> int:
    p = job_config.parallelism
    if p.data_parallel_shard_degree != -1:
        return p.data_parallel_shard_degree * p.data_parallel_replicate_degree
    others = p.tensor_parallel_degree * p.context_parallel_degree * p.pipeline_parallel_degree
    return _world_size(job_config) // others


def check_combinations(job_config) -> None:
    """Settings that are each valid but cannot work together (run after check_parallelism)."""
    p, t = job_config.parallelism, job_config.training
    tp = p.tensor_parallel_degree
    args = get_train_spec(job_config.model.name).model_args[job_config.model.flavor]
    n_heads = args.n_heads
    n_kv_heads = getattr(args, "n_kv_heads", None) or n_heads
    if n_heads % tp:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree = {tp} does not divide the "
            f"{n_heads} attention heads of model.flavor = {job_config.model.flavor!r}"
        )
    if n_kv_heads % tp:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree = {tp} does not divide the "
            f"{n_kv_heads} key/value heads of model.flavor = {job_config.model.flavor!r}"
        )
    divisor = tp * 2 * p.context_parallel_degree
    if t.seq_len % divisor:
        raise ConfigError(
            f"training.seq_len = {t.seq_len}: must be divisible by parallelism.tensor_parallel_degree = "
            f"{tp} x 2 x parallelism.context_parallel_degree = {p.context_parallel_degree} (= {divisor}, "
            "sequence parallelism)"
        )
    dp = _dp_degree(job_config)
    if t.global_batch_size != -1 and t.global_batch_size % (t.local_batch_size * dp):
        raise ConfigError(
            f"training.global_batch_size = {t.global_batch_size}: must be a multiple of "
            f"training.local_batch_size = {t.local_batch_size} x the data-parallel degree {dp} "
            "(parallelism.data_parallel_shard_degree x parallelism.data_parallel_replicate_degree)"
        )
    if (
        job_config.compile.enable
        and tp > 1
        and not torch.cuda.is_available()
        and torch.__version__.startswith(_COMPILE_TP_BROKEN_ON_CPU)
    ):
        raise ConfigError(
            f"compile.enable = true with parallelism.tensor_parallel_degree = {tp} is known broken on "
            f"CPU with torch {torch.__version__} (wrong losses or crashes): disable one of them"
        )
    if p.pipeline_parallel_degree > 1:
        _check_pipeline(job_config)
    v = job_config.validation
    if v.enable and v.steps == -1 and _world_size(job_config) > 1:
        raise ConfigError(
            "validation.steps = -1 (whole held-out split) with validation.enable = true and "
            f"{_world_size_source(job_config)} can hang when ranks hold different numbers of "
            "batches: set a positive validation.steps"
        )


def _check_pipeline(job_config) -> None:
    pp = job_config.parallelism.pipeline_parallel_degree
    if job_config.optimizer.name == "ManifoldMuon":
        # Its owner all-to-alls assume every rank of a parameter's group holds the same matrices;
        # pipeline stages hold different ones (untested, so refused rather than guessed).
        raise ConfigError(
            f"optimizer.name = 'ManifoldMuon' with parallelism.pipeline_parallel_degree = {pp} is not "
            "supported: use FSDP/TP, or AdamW with pipeline parallelism"
        )
    stages = job_config.parallelism.module_fqns_per_model_part
    if _has_embedding_norm(job_config) and not any(
        "tok_embeddings" in stage and "emb_norm" in stage for stage in stages or []
    ):
        # torchtitan's default stage split lists tok_embeddings/layers/norm/output only and
        # sets every other top-level module to None: the embedding norm would silently vanish.
        raise ConfigError(
            f"model.name = {job_config.model.name!r} has an embedding norm (emb_norm) with "
            f"parallelism.pipeline_parallel_degree = {pp}: list "
            '"emb_norm" after "tok_embeddings" in parallelism.module_fqns_per_model_part (the default '
            "stage split drops it)"
        )


def _meta_model(job_config):
    """The configured model on the meta device: structure only, no memory or compute."""
    spec = get_train_spec(job_config.model.name)
    args = copy.deepcopy(spec.model_args[job_config.model.flavor])
    args.update_from_config(job_config)
    with torch.device("meta"):
        return spec.model_cls(args)


def _has_embedding_norm(job_config) -> bool:
    return getattr(_meta_model(job_config), "emb_norm", None) is not None


def check_geometry_routing(job_config) -> None:
    """ManifoldMuon: every rule must send only 2-D weights to a matrix geometry (checked on a
    meta-device model, so no memory or compute)."""
    if job_config.optimizer.name != "ManifoldMuon":
        return
    from titan_geonorm.optim.routing import assign_geometries

    model = _meta_model(job_config)
    mm = job_config.optimizer.manifold_muon
    try:
        assign_geometries(model.named_parameters(), mm.preset, mm.rules)
    except ValueError as e:
        raise ConfigError(
            f"optimizer.manifold_muon.rules = {mm.rules!r} with optimizer.manifold_muon.preset = {mm.preset!r}: {e}"
        ) from None
