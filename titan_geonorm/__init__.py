"""titan-geonorm: GeoNorm, Peri-LN and per-module Manifold Muon for torchtitan 0.2.2.

Importing the package (torchtitan's `[experimental] custom_import = "titan_geonorm"`) registers
the train specs and makes checkpoint retention count complete checkpoints only
(`titan_geonorm.checkpoint`). On a machine without an accelerator it first applies the CPU patches,
which must precede torchtitan's import (see `titan_geonorm.cpu_patches`).
"""

from titan_geonorm.cpu_patches import apply_cpu_patches

apply_cpu_patches()

from titan_geonorm.checkpoint import patch_purge_counts_complete_checkpoints  # noqa: E402
from titan_geonorm.registry import register_all  # noqa: E402

patch_purge_counts_complete_checkpoints()
register_all()

__version__ = "0.1.0"
