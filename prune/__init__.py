"""Minitron for hybrid checkpoints: prune depth and width by activation importance, then recover
the pruned model by distillation on the teacher's logits.

`prune.pipeline.prune` runs the pruning; `prune.importance` scores, `prune.slicing` cuts,
`prune.targets` names the target, `prune.search` searches a budget; `prune.distill` is the
distillation trainer (`prune.proxy`: the short one the search ranks with), with `prune.fast_training` for its
fused training forward;
`prune.cli` is `nanokit prune` and `nanokit distill`.
"""
