"""Report: matplotlib figures (Agg, no pyplot) and one self-contained HTML file from evaluate's outputs."""

from stl.report.figures import (
    figure_png,
    plot_confusion_matrix,
    plot_per_class,
    plot_roc,
    plot_sample_grid,
    plot_training_curves,
    save_figure,
    token_label_map,
    token_label_maps,
)
from stl.report.html import render_report

__all__ = [
    "figure_png",
    "plot_confusion_matrix",
    "plot_per_class",
    "plot_roc",
    "plot_sample_grid",
    "plot_training_curves",
    "render_report",
    "save_figure",
    "token_label_map",
    "token_label_maps",
]
