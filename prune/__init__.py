"""Minitron-style pruning of hybrid checkpoints: depth and width, by activation importance.

`prune.pipeline.prune` runs it all; `prune.importance` scores, `prune.slicing` cuts,
`prune.targets` names the target, `prune.search` searches a budget, `prune.cli` is `nanokit prune`.
"""
