"""Figures: ACM attention maps (the paper's Fig. 4) and training-loss curves."""

from .attention import (  # noqa: F401
    acm_modules,
    capture_attention,
    default_module,
    ground_truth_mask,
    overlap_scores,
    render_attention,
    resolve_modules,
    select_groups,
    short_name,
)
from .curves import plot_loss_curve  # noqa: F401
