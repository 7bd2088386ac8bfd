"""The package's import contract: the maths core is inert, torchtitan's plugin hook registers."""

import subprocess
import sys


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_core_imports_no_torchtitan_and_patches_nothing():
    code = (
        "import sys, torch, torch.distributed as dist\n"
        "barrier = dist.barrier\n"
        "import titan_geonorm, titan_geonorm.optim.msign, titan_geonorm.optim.geometries\n"
        "import titan_geonorm.geonorm, titan_geonorm.peri_ln, titan_geonorm.norms\n"
        "import titan_geonorm.config, titan_geonorm.titan, titan_geonorm.titan.patches\n"
        "print('torchtitan' in sys.modules, dist.barrier is barrier, hasattr(torch.cpu, 'memory_stats'))"
    )
    assert _python(code) == "False True False"


def test_custom_import_from_a_torchtitan_process_registers_the_specs():
    # As in `torchrun -m torchtitan.train`: torchtitan first, then the plugin by name.
    code = (
        "import importlib\n"
        "from torchtitan.protocols.train_spec import get_train_spec\n"
        "importlib.import_module('titan_geonorm')  # what [experimental] custom_import does\n"
        "print(get_train_spec('llama3_geonorm').model_cls.__name__)"
    )
    assert _python(code) == "VariantTransformer"
