# Copyright (c) radfm3d contributors. Apache-2.0.
"""The <box> text codec: formatting, tolerant parsing of model text, and grid <-> 0..99 round trips."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from radfm3d.text.boxes import (
    BOX_MAX,
    format_box,
    format_boxes,
    grid_box_to_normalised,
    normalised_to_grid_box,
    order_box,
    parse_boxes,
)


def test_format_box_orders_corners_and_validates():
    assert format_box((10, 20, 30, 40, 50, 60)) == "<box>10,20,30,40,50,60</box>"
    assert format_box((40, 20, 60, 10, 50, 30)) == "<box>10,20,30,40,50,60</box>"
    assert format_boxes([(0, 0, 0, 1, 1, 1), (2, 2, 2, 3, 3, 3)]) == "<box>0,0,0,1,1,1</box> <box>2,2,2,3,3,3</box>"
    for bad in [(0, 0, 0, 1, 1), (0, 0, 0, 1, 1, 100), (-1, 0, 0, 1, 1, 1), (0.5, 0, 0, 1, 1, 1)]:
        with pytest.raises(ValueError):
            format_box(bad)


def test_parse_round_trips_format():
    box = (3, 97, 0, 55, 12, 99)
    assert parse_boxes(format_box(box)) == [order_box(box)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The nodule is at <box>12,34,5,20,40,9</box>.", [(12, 34, 5, 20, 40, 9)]),
        ("<BOX> 12 , 34,5 ;20 40 9 </Box>", [(12, 34, 5, 20, 40, 9)]),  # case, spaces, mixed separators
        ("< box >(20,40,9),(12,34,5)</ box>", [(12, 34, 5, 20, 40, 9)]),  # brackets, corners swapped
        ("<box>x=12, y=34, z=5, x=20, y=40, z=9</box>", [(12, 34, 5, 20, 40, 9)]),  # axis labels
        ("<box>12.0,34,5,20,40,9.</box>", [(12, 34, 5, 20, 40, 9)]),  # integral decimals
        ("<box>1,2,3,4,5</box>", []),  # five numbers
        ("<box>1,2,3,4,5,6,7</box>", []),  # seven numbers
        ("<box>1,2,3,4,5,100</box>", []),  # out of range
        ("<box>-1,2,3,4,5,6</box>", []),  # negative
        ("<box>1.5,2,3,4,5,6</box>", []),  # fraction
        ("<box>left lung 1,2,3,4,5,6</box>", []),  # words inside
        ("<box>1,2,3,4,5,6", []),  # truncated generation, no closing tag
        ("", []),
    ],
)
def test_parse_boxes_is_tolerant_but_strict_about_content(text, expected):
    assert parse_boxes(text) == expected


def test_parse_keeps_good_boxes_among_bad_ones_in_order():
    text = ("First <box>1,2,3,4,5,6</box>, then junk <box>1,2,3</box>, then <box> 9,9,9 , 1,1,1 </box>"
            " and a cut-off <box>7,7,7,8,8")
    assert parse_boxes(text) == [(1, 2, 3, 4, 5, 6), (1, 1, 1, 9, 9, 9)]


def test_full_grid_maps_to_extremes_and_back_exactly():
    size = (128, 96, 32)
    full = (-0.5, -0.5, -0.5, 127.5, 95.5, 31.5)
    assert grid_box_to_normalised(full, size) == (0, 0, 0, BOX_MAX, BOX_MAX, BOX_MAX)
    assert np.allclose(normalised_to_grid_box((0, 0, 0, 99, 99, 99), size), full)
    # outside the grid is clipped to it
    assert grid_box_to_normalised((-40, -3, -9, 500, 96, 100), size) == (0, 0, 0, 99, 99, 99)


@pytest.mark.parametrize("size", [(128, 128, 32), (32, 32, 8), (7, 250, 1)])
def test_round_trip_error_is_at_most_one_step(size):
    rng = np.random.default_rng(0)
    n = np.array(size * 2, dtype=np.float64)
    step = n / 99.0
    worst = 0.0
    for _ in range(500):
        a, b = rng.uniform(-0.5, np.array(size) - 0.5), rng.uniform(-0.5, np.array(size) - 0.5)
        box = np.concatenate([np.minimum(a, b), np.maximum(a, b)])
        enc = grid_box_to_normalised(box, size)
        assert all(isinstance(v, int) and 0 <= v <= 99 for v in enc)
        dec = np.asarray(normalised_to_grid_box(enc, size))
        err = np.abs(dec - box) / step
        assert np.all(err <= 1.0 + 1e-9)  # never more than one step
        rounded = np.array([enc[k + 3] - enc[k] >= 2 for k in range(3)] * 2)  # not pulled apart
        assert np.all(err[rounded] <= 0.5 + 1e-9)
        worst = max(worst, float(err.max()))
    assert worst <= 1.0 + 1e-9


def test_encoding_is_exact_on_step_positions_and_idempotent():
    size = (99, 198, 33)  # steps of 1, 2 and 1/3 voxel
    for v in itertools.product([0, 1, 50, 98, 99], repeat=2):
        box = (v[0], v[0], v[0], max(v[1], v[0] + 1) if v[0] < 99 else 99, 99, 99)
        grid = normalised_to_grid_box(box, size)
        assert grid_box_to_normalised(grid, size) == order_box(box)


def test_small_boxes_never_collapse():
    size = (128, 128, 32)
    tiny = (60.1, 60.1, 10.1, 60.4, 60.4, 10.3)  # far smaller than one step (1.29 voxels)
    enc = grid_box_to_normalised(tiny, size)
    assert all(enc[k + 3] - enc[k] == 1 for k in range(3))
    dec = normalised_to_grid_box(enc, size)
    assert all(dec[k] <= tiny[k] + 1.3 and dec[k + 3] >= tiny[k + 3] - 1.3 for k in range(3))
    # a point box stays a point; one at the upper edge is pulled downwards
    assert grid_box_to_normalised((5, 5, 5, 5, 5, 5), size)[:3] == grid_box_to_normalised((5, 5, 5, 5, 5, 5), size)[3:]
    edge = grid_box_to_normalised((127.2, 0, 0, 127.5, 1, 1), size)
    assert (edge[0], edge[3]) == (98, 99)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        grid_box_to_normalised((0, 0, 0, 1, 1), (8, 8, 8))
    with pytest.raises(ValueError):
        grid_box_to_normalised((0, 0, 0, 1, 1, float("nan")), (8, 8, 8))
    with pytest.raises(ValueError):
        grid_box_to_normalised((0, 0, 0, 1, 1, 1), (8, 8))
    with pytest.raises(ValueError):
        normalised_to_grid_box((0, 0, 0, 1, 1, 120), (8, 8, 8))
