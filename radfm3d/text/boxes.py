# Copyright (c) radfm3d contributors. Apache-2.0.
"""3D boxes as text: ``<box>x1,y1,z1,x2,y2,z2</box>`` with integers 0..99 normalised to the model grid.

Convention (one place, used by training targets and by the parser alike):

- Grid boxes are ``(lo0, lo1, lo2, hi0, hi1, hi2)`` in continuous grid-index coordinates with voxel centres
  at integers (as in :mod:`radfm3d.transforms`): a grid of ``n`` voxels spans ``[-0.5, n - 0.5]`` along
  that axis, and a box covering voxels ``a..b`` completely is ``(a - 0.5, b + 0.5)``.
- A normalised value ``v`` in ``0..99`` is the position ``c(v) = -0.5 + v / 99 * n`` on that axis, i.e. the
  grid's field of view edge to edge in 99 equal steps: 0 is the low edge of the grid, 99 the high edge.
  Encoding rounds to the nearest step, so a face moves by at most half a step (``n / 198`` voxels) in a
  round trip; positions outside the grid are clipped to it.
- A box with positive extent on an axis never collapses to zero width: if both faces round to the same
  value ``k`` they become ``(k, k + 1)`` or ``(k - 1, k)``, whichever side the box lies on, so a face then
  moves by at most one step.
- The axis order is the grid's (``recipe.axcodes``, "RAS" by default): x = grid axis 0, y = 1, z = 2.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "BOX_MAX",
    "BOX_PATTERN",
    "format_box",
    "format_boxes",
    "parse_boxes",
    "order_box",
    "grid_box_to_normalised",
    "normalised_to_grid_box",
]

#: largest normalised coordinate (values are 0..BOX_MAX)
BOX_MAX = 99
_STEPS = float(BOX_MAX)

#: ``<box> ... </box>`` (case-insensitive, body without another ``<``); the body is parsed by :func:`_parse_body`
BOX_PATTERN = re.compile(r"<\s*box\s*>([^<]*)<\s*/\s*box\s*>", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d*)?")
_BODY_OK = re.compile(r"^[\s\d.,;:+\-()\[\]{}xyz=]*$", re.IGNORECASE)  # digits, separators, brackets, axis names


def order_box(box6: Sequence[float]) -> tuple:
    """``(a0, a1, a2, b0, b1, b2)`` -> per-axis ``(min..., max...)`` (corners in any order)."""
    if len(box6) != 6:
        raise ValueError(f"a box has 6 values (x1, y1, z1, x2, y2, z2), got {len(box6)}")
    lo = tuple(min(box6[a], box6[a + 3]) for a in range(3))
    hi = tuple(max(box6[a], box6[a + 3]) for a in range(3))
    return lo + hi


def format_box(box6: Sequence[int]) -> str:
    """Six ints in 0..99 -> ``"<box>x1,y1,z1,x2,y2,z2</box>"`` (corners ordered low then high)."""
    values = [int(v) for v in box6]
    if len(values) != 6 or any(v != float(b) for v, b in zip(values, box6)):
        raise ValueError(f"format_box needs 6 integers, got {list(box6)!r}")
    if any(not 0 <= v <= BOX_MAX for v in values):
        raise ValueError(f"box values must lie in 0..{BOX_MAX}, got {values}")
    return "<box>" + ",".join(str(v) for v in order_box(values)) + "</box>"


def format_boxes(boxes: Sequence[Sequence[int]], separator: str = " ") -> str:
    """Several boxes -> their ``<box>`` texts joined by ``separator``."""
    return separator.join(format_box(b) for b in boxes)


def _parse_body(body: str) -> tuple[int, int, int, int, int, int] | None:
    """Body of one ``<box>`` -> ordered six ints, or None when malformed (not exactly 6 numbers in 0..99,
    letters other than axis names, non-integral decimals)."""
    if not _BODY_OK.match(body):
        return None
    numbers = _NUMBER.findall(body)
    if len(numbers) != 6:
        return None
    values: list[int] = []
    for text in numbers:
        value = float(text)
        if not math.isfinite(value) or value != round(value) or not 0 <= value <= BOX_MAX:
            return None
        values.append(int(round(value)))
    return order_box(values)  # type: ignore[return-value]


def parse_boxes(text: str) -> list[tuple[int, int, int, int, int, int]]:
    """All well-formed ``<box>`` boxes in model text, in order of appearance, corners ordered (lo..., hi...).

    Tolerant of what language models write: upper-case tags, spaces inside tags and between numbers,
    any of ``, ; :`` or whitespace as separators, brackets (``<box>(1,2,3),(4,5,6)</box>``), axis labels
    (``x=1``), integral decimals (``12.0``). Boxes that are malformed are skipped: not six numbers, a value
    outside 0..99, a fraction, other words inside, or a missing closing tag.
    """
    if not text:
        return []
    boxes = []
    for match in BOX_PATTERN.finditer(str(text)):
        box = _parse_body(match.group(1))
        if box is not None:
            boxes.append(box)
    return boxes


def _axis_sizes(spatial_size: Sequence[int]) -> tuple[float, float, float]:
    sizes = tuple(float(s) for s in spatial_size)
    if len(sizes) != 3 or any(not s >= 1 for s in sizes):
        raise ValueError(f"spatial_size must be 3 positive ints (the model grid), got {tuple(spatial_size)}")
    return sizes  # type: ignore[return-value]


def grid_box_to_normalised(box_ijk: Sequence[float], spatial_size: Sequence[int]) -> tuple[int, ...]:
    """Continuous grid box ``(lo0, lo1, lo2, hi0, hi1, hi2)`` (voxel index units, centres at integers) on a grid of
    ``spatial_size`` voxels -> six ints 0..99 (see the module docstring for the convention)."""
    sizes = _axis_sizes(spatial_size)
    values = [float(v) for v in box_ijk]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box values must be finite, got {list(box_ijk)}")
    ordered = order_box(values)
    lo, hi = ordered[:3], ordered[3:]
    out_lo, out_hi = [], []
    for a, n in enumerate(sizes):
        x_lo, x_hi = _to_steps(lo[a], n), _to_steps(hi[a], n)
        v_lo, v_hi = _round(x_lo), _round(x_hi)
        if v_lo == v_hi and hi[a] > lo[a]:  # keep a real extent: one step, on the side the box leans to
            if x_hi >= v_hi and v_hi < BOX_MAX:
                v_hi += 1
            else:
                v_lo -= 1
        out_lo.append(v_lo)
        out_hi.append(v_hi)
    return tuple(out_lo + out_hi)


def _to_steps(coordinate: float, n: float) -> float:
    """Grid coordinate -> position in steps (0..99) along an axis of ``n`` voxels, clipped to the grid."""
    return min(max((coordinate + 0.5) / n * _STEPS, 0.0), _STEPS)


def _round(steps: float) -> int:
    return int(math.floor(steps + 0.5))  # round half up


def normalised_to_grid_box(box_0_99: Sequence[float], spatial_size: Sequence[int]) -> tuple[float, ...]:
    """Six values 0..99 -> continuous grid box ``(lo0, lo1, lo2, hi0, hi1, hi2)`` in voxel index units
    (``-0.5 + v / 99 * n`` per axis; corners ordered)."""
    sizes = _axis_sizes(spatial_size)
    values = order_box([float(v) for v in box_0_99])
    if any(not 0 <= v <= BOX_MAX for v in values):
        raise ValueError(f"normalised box values must lie in 0..{BOX_MAX}, got {list(box_0_99)}")
    return tuple(-0.5 + values[k] / _STEPS * sizes[k % 3] for k in range(6))
