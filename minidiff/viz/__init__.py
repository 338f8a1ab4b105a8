"""What a person looks at: plots, grids of pictures, and the trace of the denoising loop (Pillow only)."""

from minidiff.viz.grid import image_grid, labeled_grid, rows_of, tile
from minidiff.viz.plotting import PALETTE, TEXT, font, line_plot, loglog_panels, loglog_plot, save_png

__all__ = ["image_grid", "labeled_grid", "rows_of", "tile", "PALETTE", "TEXT", "font", "line_plot", "loglog_panels", "loglog_plot", "save_png"]
