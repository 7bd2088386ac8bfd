# Tests import torchtitan directly, in this process and in spawned ranks (which import this package
# first): on a CPU-only host the CPU patches must precede that, as the launcher does for real runs.
from titan_geonorm.titan.patches import apply_cpu_patches

apply_cpu_patches()
