"""The torchtitan 0.2.2 wing: the only package that knows torchtitan's trainer-side APIs.

- `specs`: the train specs (`register`), `launcher`: `python -m titan_geonorm.train`,
  `preflight`: config checks before any compute, `trainer`: Trainer + divergence guard,
  `metrics`, `optimizers` (ManifoldMuon container), `data` (loader and validator builders),
  `parallelize` (TP/CP/AC/compile/FSDP per block variant), `patches` (every runtime patch).

Importing this package itself is still inert (`patches` must be importable before torchtitan).
A move to torchtitan 0.3 should touch this package only.
"""


def register() -> None:
    """Register the plugin's train specs with torchtitan (idempotent)."""
    from titan_geonorm.titan.specs import register_all

    register_all()
