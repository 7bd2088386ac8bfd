"""Parallelize functions of the plugin's train specs.

`parallelize_variant` applies, in torchtitan's order, tensor/sequence parallelism (a plan per block
variant), context parallelism, activation checkpointing, per-block torch.compile and FSDP2/HSDP/DDP
to a `VariantTransformer`, reusing torchtitan's llama3 pieces; only the TP plan is the plugin's.
`parallelize_llama3_titan` is torchtitan's `parallelize_llama` for the stock model. Both add:

- gloo has no PREMUL_SUM reduce op, which FSDP2 uses to pre-divide gradients: on a gloo process
  group every FSDP module is switched to sum reduction.
- torchtitan 0.2.2 divides the loss by the *global* token count and disables FSDP's gradient
  division, but its DDP path keeps DDP's averaging all-reduce, so pure-DDP gradients come out
  `1/dp_replicate` too small (grad-norm, clipping and Adam's eps then differ from FSDP). DDP is
  given a summing all-reduce hook instead.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
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
from torchtitan.tools.utils import device_type

from titan_geonorm.models.args import BlockVariant


def force_sum_reduction_on_gloo(model: nn.Module) -> None:
    """Make FSDP2 reduce with SUM when the default process group is gloo."""
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def _allreduce_sum_hook(process_group, bucket) -> torch.futures.Future[torch.Tensor]:
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def sum_gradients_under_ddp(model: nn.Module, parallel_dims: ParallelDims) -> None:
    """Replace DDP's averaging gradient all-reduce by a sum (loss is already globally scaled)."""
    if parallel_dims.dp_replicate_enabled and not parallel_dims.fsdp_enabled:
        model.register_comm_hook(None, _allreduce_sum_hook)


def init_shards_like_one_process(model: nn.Module, model_cls: type[nn.Module]) -> None:
    """On gloo, make `model.init_weights` give every rank its slice of one full initialization.

    DTensor's random ops only support CUDA-like devices: on CPU each rank fills its local shards
    from its own generator, and since every process starts from the same default seed, all
    ranks draw the same values (TP weights come out rank-deficient, FSDP shards repeat). Here
    every rank initializes a full unsharded copy from rank 0's generator state and keeps its own
    slice (`distribute_tensor(..., src_data_rank=None)` slices locally, no communication), so a
    multi-rank run starts from exactly the weights of a one-process run. Costs one full model
    per rank, which is only acceptable because gloo means a CPU development run.
    """
    if not dist.is_initialized() or dist.get_backend() != "gloo" or dist.get_world_size() == 1:
        return
    from titan_geonorm.optim.routing import clean_name

    init_sharded = model.init_weights

    def init_weights(*args, **kwargs):
        # The generator state a one-process run would init from: taken before the sharded init
        # (which draws less), and rank 0's so that every rank builds the same full copy.
        rng = torch.get_rng_state()
        init_sharded(*args, **kwargs)
        dist.broadcast(rng, src=0)
        torch.set_rng_state(rng)
        with torch.device("meta"):  # as torchtitan builds it: no default-init draws
            full = model_cls(model.model_args)
        full.to_empty(device="cpu")
        full.init_weights()
        reference = full.state_dict()
        with torch.no_grad():
            for name, param in model.named_parameters():
                value = reference[clean_name(name)].to(param.dtype)
                if isinstance(param, DTensor):
                    value = distribute_tensor(
                        value, param.device_mesh, param.placements, src_data_rank=None
                    ).to_local()
                    param = param.to_local()
                param.copy_(value)

    model.init_weights = init_weights


def parallelize_llama3_titan(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    check_known_broken(parallel_dims, job_config)
    model_cls = type(model)
    model = parallelize_llama(model, parallel_dims, job_config)
    init_shards_like_one_process(model, model_cls)
    force_sum_reduction_on_gloo(model)
    sum_gradients_under_ddp(model, parallel_dims)
    return model


def check_known_broken(parallel_dims: ParallelDims, job_config: JobConfig) -> None:
    """Refuse combinations seen failing on torch 2.13 CPU (DESIGN.md section 2)."""
    if device_type == "cpu" and parallel_dims.tp_enabled and job_config.compile.enable:
        raise ValueError(
            "compile.enable = true with parallelism.tensor_parallel_degree > 1 is known broken on "
            "CPU with torch 2.13 (wrong loss or crash); disable compile or tensor parallelism"
        )


class SequenceParallelUpdate(SequenceParallel):
    """SequenceParallel for a module of two sequence-sharded tensors, `GeodesicStep(h, u)`.

    Both inputs become DTensors sharded on the sequence dim, the step scalar is replicated (its
    gradient is then summed over the TP group by DTensor), and the output goes back to a local
    tensor like the residual stream it replaces. The update is per token, so it needs no
    communication in the forward.
    """

    def __init__(self, *, sequence_dim: int = 1):
        super().__init__(sequence_dim=sequence_dim, use_local_output=True)

    @staticmethod
    def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
        prepare = SequenceParallel._prepare_input_fn
        return tuple(prepare(sequence_sharding, mod, (x,), device_mesh) for x in inputs)


def _norm_plan(block: BlockVariant) -> dict:
    """Sequence-parallel styles of a block's norms and GeoNorm updates.

    Norms whose output feeds a sublayer stay DTensors (the sublayer's input preparation
    all-gathers them); norms whose output joins the residual stream, which torchtitan keeps as a
    local sequence shard, return local tensors.
    """
    if block == BlockVariant.POST:
        return {
            "attention_norm": SequenceParallel(use_local_output=True),
            "ffn_norm": SequenceParallel(use_local_output=True),
        }
    plan = {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}
    if block == BlockVariant.PERI:
        plan["attention_out_norm"] = SequenceParallel(use_local_output=True)
        plan["ffn_out_norm"] = SequenceParallel(use_local_output=True)
    if block == BlockVariant.GEONORM:
        plan["attention_step"] = SequenceParallelUpdate()
        plan["ffn_step"] = SequenceParallelUpdate()
    return plan


def apply_variant_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    loss_parallel: bool,
    enable_float8_tensorwise_tp: bool,
) -> None:
    """Tensor + sequence parallelism. For `pre` this is exactly torchtitan's llama3 plan."""
    block = model.model_args.block
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
            Float8RowwiseParallel as rowwise,
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
            "feed_forward": prepare_input(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": colwise(),
            "feed_forward.w2": rowwise(output_layouts=Shard(1)),
            "feed_forward.w3": colwise(),
            **_norm_plan(block),
        }
        parallelize_module(transformer_block, tp_mesh, plan)
    float8 = "Float8 tensorwise " if enable_float8_tensorwise_tp else ""
    logger.info(f"Applied {float8}tensor parallelism to the {block} blocks")


def parallelize_variant(
    model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig
) -> nn.Module:
    """TP, CP, AC, per-block compile, then FSDP2/HSDP or DDP: torchtitan's llama3 sequence."""
    check_known_broken(parallel_dims, job_config)
    init_shards_like_one_process(model, type(model))
    if job_config.training.seq_len % parallel_dims.seq_len_divisor:
        raise ValueError(
            f"training.seq_len = {job_config.training.seq_len} must be divisible by "
            f"tensor_parallel_degree x 2 x context_parallel_degree = {parallel_dims.seq_len_divisor}"
        )
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
