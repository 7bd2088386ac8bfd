"""`[diagnostics]`: which geometry diagnostics the trainer logs (`titan_geonorm.diagnostics`)."""

from dataclasses import dataclass


@dataclass
class DiagnosticsConfig:
    enable: bool = False
    """Log geometry diagnostics (`titan_geonorm.diagnostics`). Off: no hooks, no cost."""

    freq: int = 50
    """Diagnostic steps: step 1 and every multiple of `freq`."""

    attention_sequences: int = 1
    """Sequences of each rank's first micro-batch used for the attention logit/entropy side
    computation."""

    attention_max_tokens: int = 256
    """Leading tokens of each of those sequences used for the attention side computation."""

    singular_values: bool = True
    """Compute largest/smallest singular values (exact SVD of every block matrix, spread over
    ranks): the costliest part at scale."""

    def validate(self) -> None:
        """Raise ValueError naming `diagnostics.<key>` for the first bad value."""
        for key in ("enable", "singular_values"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"diagnostics.{key} = {getattr(self, key)!r}: must be true or false")
        for key in ("freq", "attention_sequences", "attention_max_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"diagnostics.{key} = {value!r}: must be an integer >= 1")
