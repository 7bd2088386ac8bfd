"""Per-module Manifold Muon: msign, the per-matrix geometries, name routing and the optimizer."""

from titan_geonorm.optim.builder import ManifoldMuonContainer, build_optimizers
from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.manifold_muon import ManifoldMuon
from titan_geonorm.optim.msign import msign
from titan_geonorm.optim.routing import PRESETS, assign_geometries

__all__ = [
    "ManifoldMuon",
    "ManifoldMuonConfig",
    "ManifoldMuonContainer",
    "PRESETS",
    "assign_geometries",
    "build_optimizers",
    "msign",
]
