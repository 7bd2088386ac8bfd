"""torchtitan glue: the plugin's train specs.

Every spec shares the plugin's builders (tokenizer, dataloader, validator, optimizer); specs differ
only in model class, flavor args and parallelize function. This is the one place that knows
torchtitan 0.2.2's TrainSpec layout.
"""

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.train_spec import TrainSpec, register_train_spec

from titan_geonorm.data.tokenizer import build_tokenizer
from titan_geonorm.models.blocks import BLOCKS, BlockVariant
from titan_geonorm.models.flavors import make_flavors, variant_flavors
from titan_geonorm.models.model import VariantTransformer
from titan_geonorm.titan.data import build_dataloader, build_validator
from titan_geonorm.titan.metrics import build_metrics_processor
from titan_geonorm.titan.optimizers import build_optimizers
from titan_geonorm.titan.parallelize import parallelize_llama3_titan, parallelize_variant


def make_train_spec(model_cls, model_args: dict, parallelize_fn, state_dict_adapter=None):
    return TrainSpec(
        model_cls=model_cls,
        model_args=model_args,
        parallelize_fn=parallelize_fn,
        pipelining_fn=pipeline_llm,
        build_optimizers_fn=build_optimizers,
        build_lr_schedulers_fn=build_lr_schedulers,
        build_dataloader_fn=build_dataloader,
        build_tokenizer_fn=build_tokenizer,
        build_loss_fn=build_cross_entropy_loss,
        build_validator_fn=build_validator,
        build_metrics_processor_fn=build_metrics_processor,
        state_dict_adapter=state_dict_adapter,
    )


# Train spec name -> block variant: one spec per block class (`titan_geonorm.models.blocks`).
VARIANT_SPECS = {cls.spec_name: variant for variant, cls in BLOCKS.items()}


def train_specs() -> dict[str, TrainSpec]:
    specs = {
        "llama3_titan": make_train_spec(Transformer, make_flavors(), parallelize_llama3_titan, Llama3StateDictAdapter),
    }
    for name, block in VARIANT_SPECS.items():
        # Only Pre-LN has llama3's HF layout, which the adapter's q/k permutation assumes.
        adapter = Llama3StateDictAdapter if block == BlockVariant.PRE else None
        specs[name] = make_train_spec(VariantTransformer, variant_flavors(block), parallelize_variant, adapter)
    return specs


def register_all() -> None:
    """Register every spec once; registering twice must not raise (torchtitan refuses a name
    it already holds, and says so with a ValueError only)."""
    global _registered
    if _registered:
        return
    for name, spec in train_specs().items():
        register_train_spec(name, spec)
    _registered = True


_registered = False
