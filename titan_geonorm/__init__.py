"""titan-geonorm: GeoNorm, Peri-LN and per-module Manifold Muon for torchtitan 0.2.2.

Importing the package (torchtitan's `[experimental] custom_import = "titan_geonorm"`) registers
the train specs. On a machine without an accelerator it first applies the CPU patches, which
must precede torchtitan's import (see `titan_geonorm.cpu_patches`).
"""

from titan_geonorm.cpu_patches import apply_cpu_patches

apply_cpu_patches()

from titan_geonorm.registry import register_all  # noqa: E402

register_all()

__version__ = "0.1.0"
