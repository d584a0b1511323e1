"""Figures: ACM attention maps (the paper's Fig. 4) and training-loss curves."""
from .attention import (  # noqa: F401
    acm_modules,
    capture_attention,
    default_module,
    overlap_scores,
    render_attention,
    resolve_modules,
    select_groups,
)
from .curves import plot_loss_curve  # noqa: F401
