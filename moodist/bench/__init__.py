"""``moodist-bench``: the benchmark command (interim: everything in baselines.py)."""

from .baselines import ALL_BASELINES, PATTERNS, main, options_from_args, parse_sizes, plan

__all__ = ["ALL_BASELINES", "PATTERNS", "main", "options_from_args", "parse_sizes", "plan"]
