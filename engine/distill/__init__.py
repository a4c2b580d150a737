"""Training-free recovery: distillation of a pruned student on DeepSpeed ZeRO-3 (`blockprune distill`)."""
