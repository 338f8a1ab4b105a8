"""The log-log charts of minidiff.viz.plotting: short tick labels, and panels on shared axes."""

from __future__ import annotations

import pytest
from PIL import Image

from minidiff.viz.plotting import GUIDE, loglog_image, loglog_panels, spaced_labels, tick_label


def test_tick_labels_are_short():
    assert [tick_label(x) for x in (5, 10, 200, 1000)] == ["5", "10", "200", "1000"]
    assert [tick_label(x) for x in (0.041286, 0.0913, 1.4957, 14.6146)] == ["0.041", "0.091", "1.5", "15"]


def test_crowded_x_labels_are_thinned_not_overlapped():
    assert spaced_labels([0, 10, 30, 31, 60], [5, 5, 5, 5, 5]) == [0, 2, 4]  # 10 and 31 would touch their left neighbour
    assert spaced_labels([0, 100, 200], [5, 5, 5]) == [0, 1, 2]
    xs = [0.0413, 0.0445, 0.0478, 0.05, 0.06, 0.1, 1.0, 14.6]  # close together on a log axis: drawn without error
    assert loglog_image({"a": (xs, [1.0] * len(xs))}, size=(600, 300)).size[1] == 300


def test_panels_share_axes_and_colors(tmp_path):
    steps = [5, 10, 20, 50]
    panels = {
        "first": {"Euler": (steps, [1 / n for n in steps]), "DDIM": (steps, [0.9 / n for n in steps])},
        "second": {"Euler": (steps, [1 / n for n in steps]), "Heun": (steps, [1 / n**2 for n in steps])},
        "third": {"Euler": (steps, [1 / n for n in steps])},
    }
    path = loglog_panels(panels, tmp_path / "panels.png", columns=2, title="t", colors={"Euler": GUIDE},
                         panel_size=(500, 300))
    with Image.open(path) as picture:
        assert picture.height == 40 + 2 * 300 and picture.width >= 2 * 500
        colors = {color for _, color in picture.convert("RGB").getcolors(1 << 20)}
    assert GUIDE in colors
    with pytest.raises(ValueError, match="at least one"):
        loglog_panels({"empty": {"a": ([1, 2], [0.0, -1.0])}}, tmp_path / "none.png")
