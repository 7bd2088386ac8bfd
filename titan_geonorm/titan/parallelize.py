"""Parallelize functions of the plugin's train specs.

`parallelize_variant` applies, in torchtitan's order, tensor/sequence parallelism, context
parallelism, activation checkpointing, per-block torch.compile and FSDP2/HSDP/DDP to a
`VariantTransformer`, reusing torchtitan's llama3 pieces; only the TP plan is the plugin's, and
each block class supplies the entries of its own modules (`sequence_parallel_plan`).
`parallelize_llama3_titan` is torchtitan's `parallelize_llama` for the stock model. Both apply the
per-model runtime patches of `titan_geonorm.titan.patches` (gloo sum reduction, DDP gradient sum,
one-process-like init on gloo). Combinations known broken are refused earlier, by preflight.
"""

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torchtitan.config import TORCH_DTYPE_MAP, JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.context_parallel import apply_cp_to_attention_module
from torchtitan.distributed.tensor_parallel import maybe_enable_async_tp
from torchtitan.models.llama3.infra.parallelize import (
    _op_sac_save_list,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    parallelize_llama,
)
from torchtitan.tools.logging import logger

from titan_geonorm.titan.patches import (
    force_sum_reduction_on_gloo,
    init_shards_like_one_process,
    sum_gradients_under_ddp,
)


def parallelize_llama3_titan(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    model_cls = type(model)
    model = parallelize_llama(model, parallel_dims, job_config)
    init_shards_like_one_process(model, model_cls)
    force_sum_reduction_on_gloo(model)
    sum_gradients_under_ddp(model, parallel_dims)
    return model


def apply_variant_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    loss_parallel: bool,
    enable_float8_tensorwise_tp: bool,
) -> None:
    """Tensor + sequence parallelism. For `pre` this is exactly torchtitan's llama3 plan."""
    top_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "output": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel()
    if model.emb_norm is not None:
        top_plan["emb_norm"] = SequenceParallel(use_local_output=True)
    parallelize_module(model, tp_mesh, top_plan)

    if enable_float8_tensorwise_tp:
        from torchao.float8.float8_tensor_parallel import (
            Float8ColwiseParallel as colwise,
        )
        from torchao.float8.float8_tensor_parallel import (
            Float8RowwiseParallel as rowwise,
        )
        from torchao.float8.float8_tensor_parallel import (
            PrepareFloat8ModuleInput as prepare_input,
        )
    else:
        colwise, rowwise, prepare_input = ColwiseParallel, RowwiseParallel, PrepareModuleInput
    for transformer_block in model.layers.values():
        plan = {
            "attention": prepare_input(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "attention.wq": colwise(),
            "attention.wk": colwise(),
            "attention.wv": colwise(),
            "attention.wo": rowwise(output_layouts=Shard(1)),
            "feed_forward": prepare_input(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": colwise(),
            "feed_forward.w2": rowwise(output_layouts=Shard(1)),
            "feed_forward.w3": colwise(),
            **model.block_cls.sequence_parallel_plan(),
        }
        parallelize_module(transformer_block, tp_mesh, plan)
    float8 = "Float8 tensorwise " if enable_float8_tensorwise_tp else ""
    logger.info(f"Applied {float8}tensor parallelism to the {model.model_args.block} blocks")


def parallelize_variant(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig) -> nn.Module:
    """TP, CP, AC, per-block compile, then FSDP2/HSDP or DDP: torchtitan's llama3 sequence."""
    init_shards_like_one_process(model, type(model))
    if parallel_dims.tp_enabled:
        float8 = "float8" in job_config.model.converters
        recipe = job_config.quantize.linear.float8.recipe_name
        rowwise_recipe = recipe in ("rowwise", "rowwise_with_gw_hp")
        tp_mesh = parallel_dims.get_mesh("tp")
        apply_variant_tp(
            model,
            tp_mesh,
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            enable_float8_tensorwise_tp=float8 and not rowwise_recipe,
        )
        maybe_enable_async_tp(job_config, tp_mesh)
    if parallel_dims.cp_enabled:
        apply_cp_to_attention_module(
            [block.attention.inner_attention for block in model.layers.values()],
            parallel_dims.get_mesh("cp"),
            model.model_args.attn_type,
        )
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=compile_model,
            op_sac_save_list=_op_sac_save_list,
            base_folder=job_config.job.dump_folder,
        )
    if compile_model:
        apply_compile(model, job_config.compile)
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        force_sum_reduction_on_gloo(model)
    elif parallel_dims.dp_replicate_enabled:
        if parallel_dims.world_size != parallel_dims.get_mesh("dp_replicate").size():
            raise RuntimeError("DDP has not supported > 1D parallelism")
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), enable_compile=compile_model)
        sum_gradients_under_ddp(model, parallel_dims)
    return model
