"""Per-module Manifold Muon: msign, the per-matrix geometries, name routing and the optimizer.

Imports no torchtitan; the torchtitan optimizer container lives in `titan_geonorm.titan`.
"""

from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.geometries import GEOMETRIES, MATRIX_GEOMETRIES
from titan_geonorm.optim.manifold_muon import ManifoldMuon
from titan_geonorm.optim.msign import msign
from titan_geonorm.optim.routing import PRESETS, assign_geometries, clean_name

__all__ = [
    "GEOMETRIES",
    "MATRIX_GEOMETRIES",
    "ManifoldMuon",
    "ManifoldMuonConfig",
    "PRESETS",
    "assign_geometries",
    "clean_name",
    "msign",
]
