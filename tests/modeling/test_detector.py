# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations

import pytest
import torch

from radfm3d.modeling.detector import DEFAULT_DETECTOR, FindingDetector, detector_config


@pytest.mark.parametrize(("shape", "strides", "grid"), [
    ((2, 3, 128, 128, 32), DEFAULT_DETECTOR["strides"], (16, 16, 8)),   # the demo grid: cells of 8x8x4 voxels
    ((1, 3, 32, 32, 8), DEFAULT_DETECTOR["strides"], (4, 4, 2)),        # the tiny preset's grid
    ((1, 1, 32, 16, 8), [2, [2, 2, 1]], (8, 4, 4)),
])
def test_cell_logits_shape_and_grid(shape, strides, grid):
    config = detector_config({"channels": [4] * len(strides), "strides": strides}, shape[1], 5)
    detector = FindingDetector.from_config(config).eval()
    with torch.no_grad():
        logits, out_grid = detector(torch.rand(*shape))
    assert out_grid == grid
    assert logits.shape == (shape[0], grid[0] * grid[1] * grid[2], 1 + 5)


def test_cells_follow_the_h_w_d_token_order():
    """A bright blob in one corner lights the cell with the matching (h w d) index, as patch_targets numbers them."""
    torch.manual_seed(0)
    detector = FindingDetector(1, 1, channels=[1], strides=[[4, 4, 2]], kernel_size=1, norm=None).eval()
    with torch.no_grad():
        detector.features[0].conv.weight.fill_(1.0), detector.features[0].conv.bias.zero_()
        detector.classifier.weight.fill_(1.0), detector.classifier.bias.zero_()
        image = torch.zeros(1, 1, 16, 8, 4)
        image[0, 0, 12, 4, 2] = 1.0  # cell (3, 1, 1) of a (4, 2, 2) grid
        logits, grid = detector(image)
    assert grid == (4, 2, 2)
    assert int(logits[0, :, 0].argmax()) == (3 * 2 + 1) * 2 + 1


def test_config_defaults_overrides_and_errors():
    assert detector_config(None, 3, 5) is None and detector_config(False, 3, 5) is None
    full = detector_config(True, 3, 5)
    assert full["channels"] == DEFAULT_DETECTOR["channels"] and full["in_channels"] == 3
    assert detector_config({"channels": [8, 8, 8, 8]}, 1, 2)["channels"] == [8, 8, 8, 8]
    with pytest.raises(ValueError, match="3 channel widths but 4 strides"):
        detector_config({"channels": [8, 8, 8]}, 3, 5)
