"""`[divergence]`: what the trainer does when a step's loss or gradients are not finite."""

from dataclasses import dataclass

_KEY = "divergence"
ACTIONS = ("stop", "skip", "off")


@dataclass
class DivergenceConfig:
    action: str = "stop"
    """stop: raise at the first non-finite step, before its optimizer step and before any
    checkpoint of it (the last checkpoint stays the last good state) | skip: drop the step (zero
    grads, no optimizer or LR-scheduler step) and go on | off: no check (saves one reduction and
    one host sync per step)."""

    max_consecutive_skips: int = 5
    """With action = "skip": stop anyway once this many steps in a row were non-finite."""

    inject_nan_at_step: int = -1
    """Fault injection for tests only: at this step make a non-finite value appear on the last
    rank (-1: never)."""

    inject_nan_into: str = "loss"
    """Fault injection for tests only: "loss", or the name of a parameter whose gradient (the
    last rank's shard) is set to NaN."""

    def validate(self) -> None:
        """Raise ValueError naming `divergence.<key>` for the first bad value."""
        if self.action not in ACTIONS:
            raise ValueError(f"{_KEY}.action = {self.action!r}: expected one of {ACTIONS}")
        value = self.max_consecutive_skips
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{_KEY}.max_consecutive_skips = {value!r}: must be an integer >= 1")
        value = self.inject_nan_at_step
        if not isinstance(value, int) or (value < 1 and value != -1):
            raise ValueError(f"{_KEY}.inject_nan_at_step = {value!r}: must be -1 or a step >= 1")
        if not self.inject_nan_into:
            raise ValueError(f"{_KEY}.inject_nan_into = '': expected 'loss' or a parameter name")
