"""Parameter name -> geometry.

Rules are `(regex, geometry)` pairs matched with `re.search` against the *clean* parameter name
(wrapper prefixes such as `_orig_mod.` removed); the first matching rule wins. User rules come
before the preset's, and anything matched by neither goes to AdamW — this is how the token
embedding, the output head (matched by name, never by shape), norm gains, GeoNorm scalars and
biases end up on AdamW.
"""

import re
from typing import Iterable

import torch

from titan_geonorm.optim.geometries import MATRIX_GEOMETRIES

__all__ = ["GEOMETRIES", "PRESETS", "clean_name", "parse_rules", "preset_rules", "assign_geometries"]

GEOMETRIES = MATRIX_GEOMETRIES + ("adamw",)

# Module wrappers that activation checkpointing, torch.compile and FSDP1 insert into names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")

_ATTENTION = r"(^|\.)attention\.(wq|wk|wv|wo)\.weight$"
_MLP = r"(^|\.)feed_forward\.(w1|w2|w3)\.weight$"

PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    "hetero": ((_ATTENTION, "stiefel"), (_MLP, "dgram")),
    "hetero_inv": ((_ATTENTION, "dgram"), (_MLP, "stiefel")),
    "all_stiefel": ((_ATTENTION, "stiefel"), (_MLP, "stiefel")),
    "all_dgram": ((_ATTENTION, "dgram"), (_MLP, "dgram")),
    "muon": ((_ATTENTION, "muon"), (_MLP, "muon")),
    # The module-wise paper's best arm (Stiefel attention, DGram MLP); its other settings are
    # `config.PRESET_SETTINGS["paper"]`.
    "paper": ((_ATTENTION, "stiefel"), (_MLP, "dgram")),
}


def clean_name(name: str) -> str:
    """Remove wrapper prefixes anywhere in a dotted parameter name."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def parse_rules(rules: Iterable[str], key: str = "optimizer.manifold_muon.rules") -> list[tuple[re.Pattern, str]]:
    """Parse `"regex=geometry"` strings (split at the last `=`); errors name the rule."""
    parsed = []
    for rule in rules:
        pattern, sep, geometry = rule.rpartition("=")
        geometry = geometry.strip()
        if not sep or not pattern:
            raise ValueError(f"{key}: rule {rule!r} is not of the form 'regex=geometry'")
        if geometry not in GEOMETRIES:
            raise ValueError(f"{key}: rule {rule!r} names unknown geometry {geometry!r}; expected one of {GEOMETRIES}")
        try:
            parsed.append((re.compile(pattern), geometry))
        except re.error as err:
            raise ValueError(f"{key}: rule {rule!r} has an invalid regex: {err}") from err
    return parsed


def preset_rules(preset: str) -> list[tuple[re.Pattern, str]]:
    if preset not in PRESETS:
        raise ValueError(f"optimizer.manifold_muon.preset: unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
    return [(re.compile(pattern), geometry) for pattern, geometry in PRESETS[preset]]


def assign_geometries(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], preset: str, rules: Iterable[str] = ()
) -> dict[str, str]:
    """Clean name -> geometry for every trainable parameter; refuses non-2-D matrix geometries."""
    ordered = parse_rules(rules) + preset_rules(preset)
    assignment = {}
    for raw_name, param in named_params:
        if not param.requires_grad:
            continue
        name = clean_name(raw_name)
        geometry = next((geo for pattern, geo in ordered if pattern.search(name)), "adamw")
        if geometry != "adamw" and param.ndim != 2:
            raise ValueError(
                f"optimizer.manifold_muon: parameter {name!r} of shape {tuple(param.shape)} is routed "
                f"to geometry {geometry!r}, which needs a 2-D weight; route it to adamw"
            )
        assignment[name] = geometry
    return assignment
