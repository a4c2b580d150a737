"""Pure tensor solvers: statistics, importance scores, masks, reconstruction, allocation rules, expert clustering.

No files, modules or ranks here: every function takes tensors and returns tensors (DESIGN.md §1).
"""

from solvers.admm_unstructured import ADMMOptions, admm_prune, admm_prune_many
from solvers.allocation import BudgetReconciler, owl_allocation, softmax_allocation, uniform_allocation
from solvers.clustering import cluster_experts, coactivation_counts, experts_to_keep, router_distance
from solvers.group_prune import prune_groups
from solvers.groups import closed_form_reconstruct
from solvers.masks import PruneResult, magnitude_prune, nm_mask, parse_pattern, wanda_prune
from solvers.obs import obs_group_prune
from solvers.registry import (
    available_solvers,
    get_solver,
    get_solver_many,
    needs_gram,
    needs_stats,
    register_solver,
)
from solvers.sparsegpt import sparsegpt_prune, sparsegpt_prune_many
from solvers.stats import InputStats, accumulate, col_norm_sq, init_stats, layer_error, merge

__all__ = [
    "ADMMOptions",
    "BudgetReconciler",
    "InputStats",
    "PruneResult",
    "accumulate",
    "admm_prune",
    "admm_prune_many",
    "available_solvers",
    "closed_form_reconstruct",
    "cluster_experts",
    "coactivation_counts",
    "col_norm_sq",
    "experts_to_keep",
    "get_solver",
    "get_solver_many",
    "init_stats",
    "layer_error",
    "magnitude_prune",
    "merge",
    "needs_gram",
    "needs_stats",
    "nm_mask",
    "obs_group_prune",
    "owl_allocation",
    "parse_pattern",
    "prune_groups",
    "register_solver",
    "router_distance",
    "softmax_allocation",
    "sparsegpt_prune",
    "sparsegpt_prune_many",
    "uniform_allocation",
    "wanda_prune",
]
