"""Pure tensor solvers: statistics, importance scores, masks, reconstruction. No files, modules or ranks here."""

from solvers.registry import available_solvers, get_solver, needs_gram, needs_stats, register_solver
from solvers.sparsegpt import sparsegpt_prune
from solvers.stats import InputStats, accumulate, col_norm_sq, init_stats, layer_error, merge
from solvers.unstructured import PruneResult, magnitude_prune, nm_mask, parse_pattern, wanda_prune

__all__ = [
    "InputStats", "PruneResult", "accumulate", "available_solvers", "col_norm_sq", "get_solver", "init_stats",
    "layer_error", "magnitude_prune", "merge", "needs_gram", "needs_stats", "nm_mask", "parse_pattern",
    "register_solver", "sparsegpt_prune", "wanda_prune",
]
