"""titan-geonorm: GeoNorm, Peri-LN and per-module Manifold Muon for torchtitan 0.2.2.

Importing the package, or any of its maths modules (`geonorm`, `peri_ln`, `norms`, `optim.msign`,
`optim.geometries`, ...), imports no torchtitan and patches nothing. Everything that knows
torchtitan lives in `titan_geonorm.titan` (docs/architecture.md).

The one exception is torchtitan's own plugin hook: `[experimental] custom_import =
"titan_geonorm"` imports this package from inside a torchtitan process, and there (torchtitan
already loaded) the import registers the plugin's train specs, so stock launchers
(`torchrun -m torchtitan.train`) find them. `python -m titan_geonorm.train` registers them itself.
"""

import sys

__version__ = "0.1.0"

if "torchtitan" in sys.modules:
    from titan_geonorm.titan import register

    register()
