"""GPU self-test: `python -m acm_d2.selftest --help` (runner.py) says what it checks and measures.

One module per section (env, correctness, amp_training, speed: layer and model, breakdown), the
runner and report in runner.py, the issue's target ratios in targets.py.
"""

from .runner import SECTIONS, main, parse_args, run_selftest, summary_lines

__all__ = ["SECTIONS", "run_selftest", "summary_lines", "parse_args", "main"]
