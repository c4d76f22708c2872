"""Minitron-style pruning of hybrid checkpoints (depth and width, by activation importance).

Not built yet: see the pruning issue. Nothing here is importable API.
"""
