# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadPhantom volume rendering: sample a case (acquisition geometry, anatomy, findings, prior scan) and evaluate
the analytic phantom at every voxel centre.

A scan is made by mapping each voxel centre through the voxel->world affine (RAS+ mm) and testing it against the
ellipsoids of :mod:`radfm3d.data.phantoms.anatomy`, so any acquisition orientation (axial RAS/LPS, flipped axes,
sagittal, coronal) is exact and left/right is only recoverable through the geometry. Edges get a partial-volume
ramp, then blur, noise (CT) or a bias field and Rician noise (MR), and values are rounded to what int16 keeps.

Determinism: every case draws from ``numpy.random.default_rng([seed, index, stream])`` (independent streams for
anatomy/findings, geometry, noise, the prior scan and the texts), so a case never depends on the number of
workers or on which other cases were generated::

    scan, prior, gt = render_case(seed, index)          # PhantomScan(s) + JSON-able ground truth
    image, gt = make_case(seed, index)                  # MetaTensor (1, X, Y, Z) + ground truth
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from radfm3d.data.phantoms.anatomy import (
    _BODY_FRACTION, _MASS_CT, ANATOMY, FINDING_SITES, FINDING_SIZE_MM, GENERATOR_VERSION, REGIONS, SPLITS,
    TISSUES, Ellipsoid, _body_side, _rotation, organ_label,
)

__all__ = ["Acquisition", "PhantomScan", "sample_acquisition", "render_scan", "render_case", "render_study",
           "make_case", "split_of", "study_split_of", "grid_box_to_0_99", "format_box_text", "STUDY_SERIES"]

# stream ids of the per-case random generators
_S_CASE, _S_GEOM, _S_NOISE, _S_PRIOR_GEOM, _S_PRIOR_NOISE, _S_TEXT = range(6)
# multi-series studies draw from their own streams ``[seed, study index, _S_STUDY + k]`` (disjoint from the cases')
_S_STUDY = 100
_S_STUDY_CASE, _S_STUDY_TEXT, _S_STUDY_SPLIT = _S_STUDY, _S_STUDY + 1, _S_STUDY + 2
_S_STUDY_GEOM, _S_STUDY_VALUES, _S_STUDY_NOISE = _S_STUDY + 10, _S_STUDY + 20, _S_STUDY + 30
#: the series of a multi-series study: (modality, sequence)
STUDY_SERIES = (("CT", None), ("MR", "T1"), ("MR", "T2"))

# ----------------------------------------------------------------------------------------------- geometry
@dataclass
class Acquisition:
    """A scan's voxel grid: ``shape`` (X, Y, Z voxels; Z = slice axis) and ``affine`` voxel -> world RAS mm."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    plane: str       # "axial" | "coronal" | "sagittal"
    axcodes: str     # e.g. "LPS"

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def world_extent(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) world mm of the voxel extents ``[-0.5, n - 0.5]``."""
        corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in self.shape])))
        w = corners @ self.affine[:3, :3].T + self.affine[:3, 3]
        return w.min(axis=0), w.max(axis=0)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.world_extent()
        return {"shape": list(self.shape), "spacing_mm": _r(self.spacing, 4), "affine": _r(self.affine, 5),
                "plane": self.plane, "axcodes": self.axcodes, "fov_mm": _r(hi - lo, 2)}


def _r(a: Any, nd: int = 3) -> Any:
    """Round for JSON (lists of floats)."""
    arr = np.asarray(a, dtype=np.float64)
    return np.round(arr, nd).tolist()


_PLANE_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}  # world axis of voxel i, j, k
_AXNAMES = ("RL", "AP", "SI")  # letter for +/- direction of each world axis


def sample_acquisition(rng: np.random.Generator, body_centre: np.ndarray, plane: str | None = None,
                       size_range: tuple[int, int] = (96, 192), slices_range: tuple[int, int] = (24, 64)
                       ) -> Acquisition:
    """Random scan geometry: in-plane 0.6-1.2 mm, slices 1-5 mm, 96-192 matrix, 24-64 slices, any orientation.

    The slice axis is always the third voxel axis (as in DICOM series and most NIfTI conversions); the in-plane
    axes may be swapped and every axis may point either way along its world axis.
    """
    if plane is None:
        plane = str(rng.choice(["axial", "coronal", "sagittal"], p=[0.7, 0.15, 0.15]))
    n_ip = int(rng.integers(size_range[0] // 16, size_range[1] // 16 + 1)) * 16
    n_ip2 = n_ip if rng.random() < 0.7 else max(size_range[0], int(round(n_ip * rng.uniform(0.8, 1.0) / 16)) * 16)
    s_lo = max(0.6, 110.0 / n_ip2)  # field of view >= 110 mm
    s_ip = float(rng.uniform(s_lo, max(1.2, s_lo)))
    fov = n_ip2 * s_ip
    # slice coverage between 0.75x and 1.3x the in-plane FOV (thin slices on small FOVs)
    s_sl_lo = max(1.0, 0.75 * fov / slices_range[1])
    s_sl = float(rng.uniform(s_sl_lo, max(5.0, s_sl_lo)))
    n_sl = int(np.clip(round(fov * rng.uniform(0.75, 1.3) / s_sl), slices_range[0], slices_range[1]))
    axes = list(_PLANE_AXES[plane])
    if rng.random() < 0.5:
        axes[0], axes[1] = axes[1], axes[0]
    convention = rng.choice(["RAS", "LPS", "random"], p=[0.4, 0.35, 0.25])
    if convention == "RAS":
        signs = {0: 1.0, 1: 1.0, 2: 1.0}
    elif convention == "LPS":
        signs = {0: -1.0, 1: -1.0, 2: 1.0}
    else:
        signs = {w: float(rng.choice([-1.0, 1.0])) for w in range(3)}
    shape = [n_ip, n_ip2, n_sl]
    spacing = [s_ip, s_ip, s_sl]
    affine = np.eye(4)
    for v, w in enumerate(axes):
        affine[:3, v] = 0.0
        affine[w, v] = signs[w] * spacing[v]
    centre_vox = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
    fov_centre = body_centre + rng.uniform(-0.03, 0.03, 3) * fov
    affine[:3, 3] = fov_centre - affine[:3, :3] @ centre_vox
    axcodes = "".join(_AXNAMES[w][0 if signs[w] > 0 else 1] for w in axes)
    return Acquisition((n_ip, n_ip2, n_sl), affine, plane, axcodes)


# ----------------------------------------------------------------------------------------------- rendering
@dataclass
class PhantomScan:
    """One rendered scan. ``array`` (X, Y, Z) float32 (HU for CT, arbitrary units for MR, values rounded to
    integers = what is stored); ``affine`` 4x4 voxel -> world RAS mm; ``labels`` (X, Y, Z) uint8, finding
    ``k`` of ``findings`` is ``k + 1`` where its voxel centre lies inside it."""

    array: np.ndarray
    affine: np.ndarray
    labels: np.ndarray
    acquisition: Acquisition
    modality: str
    findings: list[dict[str, Any]]

    def to_metatensor(self) -> Any:
        """MetaTensor (1, X, Y, Z) with ``affine`` and load_image-style meta (needs monai/torch)."""
        import torch
        from monai.data import MetaTensor

        meta = {"space": "RAS", "source_format": "array", "modality": self.modality,
                "original_shape": tuple(self.array.shape),
                "original_spacing": tuple(map(float, self.acquisition.spacing)),
                "original_affine": self.affine.copy(), "is_2d": False, "filename_or_obj": ""}
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(self.array[None])),
                          affine=torch.as_tensor(self.affine, dtype=torch.float64), meta=meta)


def _index_block(acq: Acquisition, box: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Voxel index slices whose centres may fall in the world box (None when outside the volume)."""
    inv = np.linalg.inv(acq.affine)
    corners = np.array(list(itertools.product(*[(box[a], box[a + 3]) for a in range(3)])))
    v = corners @ inv[:3, :3].T + inv[:3, 3]
    lo = np.maximum(np.floor(v.min(axis=0)) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(v.max(axis=0)) + 2, acq.shape).astype(int)
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def _block_d2(acq: Acquisition, e: Ellipsoid, block: tuple[slice, slice, slice]) -> np.ndarray:
    """Squared normalised ellipsoid radius ``|diag(1/r) R^T (x_world - c)|^2`` at the block's voxel centres.

    ``u = M x + o`` is affine in the voxel index ``x = (i, j, k)``, so ``|u|^2`` is a quadratic form: the (i, j)
    terms are built once in 2D and only three full-size float32 operations remain (``A + B k + C k^2``).
    Indices are taken relative to the block centre to keep float32 cancellation negligible.
    """
    a = acq.affine
    m = (e.rotation.T @ a[:3, :3]) / e.radii[:, None]          # voxel index -> local unit coords
    x0 = np.array([(s.start + s.stop - 1) / 2.0 for s in block])
    o = (e.rotation.T @ (a[:3, :3] @ x0 + a[:3, 3] - e.centre)) / e.radii
    q = m.T @ m
    g = m.T @ o
    i = (np.arange(block[0].start, block[0].stop) - x0[0])[:, None]
    j = (np.arange(block[1].start, block[1].stop) - x0[1])[None, :]
    k = (np.arange(block[2].start, block[2].stop) - x0[2]).astype(np.float32)
    a2 = (q[0, 0] * i * i + q[1, 1] * j * j + 2 * q[0, 1] * i * j + 2 * g[0] * i + 2 * g[1] * j + o @ o)
    b2 = 2 * (q[0, 2] * i + q[1, 2] * j + g[2])
    d2 = b2.astype(np.float32)[:, :, None] * k
    d2 += a2.astype(np.float32)[:, :, None]
    d2 += (np.float32(q[2, 2]) * k * k)[None, None, :]
    return d2


def _block_wobble(acq: Acquisition, e: Ellipsoid, block: tuple[slice, slice, slice]) -> np.ndarray:
    """Smooth boundary modulation ``prod_w sin(2.5 t_w + phase_w)`` with ``t_w = (x_w - c_w) / r_w`` in world
    axes (independent of the acquisition); separable outer product when voxel axes are world-aligned."""
    a = acq.affine
    idx = [np.arange(s.start, s.stop, dtype=np.float64) for s in block]
    aligned = all(np.count_nonzero(np.abs(a[:3, v]) > 1e-9) == 1 for v in range(3))
    if aligned:
        factors = [np.ones(len(ix)) for ix in idx]
        for v in range(3):
            w = int(np.argmax(np.abs(a[:3, v])))
            t = (a[w, v] * idx[v] + a[w, 3] - e.centre[w]) / e.radii[w]
            factors[v] = factors[v] * np.sin(2.5 * t + e.phase[w])
        f2 = (factors[0][:, None] * factors[1][None, :]).astype(np.float32)
        return f2[:, :, None] * factors[2].astype(np.float32)
    out = np.ones([len(ix) for ix in idx], dtype=np.float32)
    for w in range(3):
        t = sum((a[w, v] * idx[v]).reshape([-1 if q == v else 1 for q in range(3)]) for v in range(3))
        out *= np.sin(2.5 * (t + a[w, 3] - e.centre[w]) / e.radii[w] + e.phase[w]).astype(np.float32)
    return out


def _paint(vol: np.ndarray, acq: Acquisition, e: Ellipsoid, value: float, labels: np.ndarray | None = None,
           label: int = 0) -> int:
    """Blend ``value`` into ``vol`` with partial-volume edges; returns the number of voxel centres inside
    the (wobble-free) ellipsoid, which are labelled ``label`` in ``labels`` when given."""
    block = _index_block(acq, e.world_box())
    if block is None:
        return 0
    d2 = _block_d2(acq, e, block)
    count = 0
    if labels is not None:
        inside = d2 <= 1.0
        labels[block][inside] = label
        count = int(np.count_nonzero(inside))
    d = np.sqrt(d2, out=d2)
    if e.wobble > 0:
        wob = _block_wobble(acq, e, block)
        wob *= np.float32(e.wobble)
        wob += np.float32(1.0)
        d /= wob
    # fraction of the voxel inside: linear ramp over about one voxel across the boundary
    h = float(np.sqrt((acq.spacing ** 2).mean()))
    slope = np.float32(float(3.0 / (1.0 / e.radii).sum()) / h)
    occ = d
    occ *= -slope
    occ += np.float32(0.5) + slope
    np.clip(occ, 0.0, 1.0, out=occ)
    sub = vol[block]
    delta = np.float32(value) - sub
    delta *= occ
    sub += delta
    return count


def _tissue_values(modality: str, sequence: str | None, rng: np.random.Generator) -> dict[str, float]:
    """Per-case tissue intensities: CT HU with small jitter; MR a.u. with a random global gain."""
    col = {"CT": 0, "T1": 1, "T2": 2}[sequence if modality == "MR" else "CT"]
    if modality == "CT":
        return {k: v[col] + (rng.normal(0, 3.0) if k != "air" else 0.0) for k, v in TISSUES.items()}
    gain = rng.uniform(0.6, 1.6)
    return {k: v[col] * gain * rng.uniform(0.93, 1.07) for k, v in TISSUES.items()}


def _finding_value(ftype: str, organ: str, modality: str, values: dict[str, float]) -> float:
    if ftype == "mass" and modality == "CT":
        return _MASS_CT.get(organ, values["mass"])
    return values[ftype]


def render_scan(acq: Acquisition, organs: list[Ellipsoid], findings: list[Ellipsoid], modality: str,
                sequence: str | None, values: dict[str, float], rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Evaluate the phantom on the acquisition grid; returns (array float32, labels uint8, voxels per finding)."""
    vol = np.full(acq.shape, values["air"], dtype=np.float32)
    labels = np.zeros(acq.shape, dtype=np.uint8)
    for e in organs:
        _paint(vol, acq, e, values[e.tissue])
    counts = [_paint(vol, acq, f, float(f.value), labels, k + 1) for k, f in enumerate(findings)]
    from scipy.ndimage import gaussian_filter

    sigma_mm = rng.uniform(0.4, 0.9)
    sigma = [min(1.0, sigma_mm / s) for s in acq.spacing]
    vol = gaussian_filter(vol, sigma=sigma, mode="nearest", truncate=2.5)
    if modality == "CT":
        vol += rng.standard_normal(acq.shape, dtype=np.float32) * np.float32(rng.uniform(4.0, 15.0))
        np.clip(vol, -1024.0, 3071.0, out=vol)
    else:
        vol *= _bias_field(acq, rng)
        sd = np.float32(rng.uniform(0.01, 0.03) * max(values.values()))
        n1 = rng.standard_normal(acq.shape, dtype=np.float32) * sd
        n2 = rng.standard_normal(acq.shape, dtype=np.float32) * sd
        vol = np.sqrt((vol + n1) ** 2 + n2 * n2)
        np.clip(vol, 0.0, 32767.0, out=vol)
    np.rint(vol, out=vol)  # what int16 storage keeps
    return vol, labels, counts


def _bias_field(acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative MR bias field exp(linear + quadratic in world mm), shape acq.shape, float32."""
    lo, hi = acq.world_extent()
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    lin = rng.uniform(-0.25, 0.25, 3)
    quad = rng.uniform(-0.2, 0.1, 3)
    field_ = np.zeros(acq.shape, dtype=np.float32)
    a = acq.affine
    for w in range(3):  # world coordinate w as a function of voxel indices (broadcast sum)
        coord = np.float32(a[w, 3] - centre[w])
        parts = [(np.arange(n, dtype=np.float32) * np.float32(a[w, v])).reshape([-1 if q == v else 1 for q in range(3)])
                 for v, n in enumerate(acq.shape)]
        t = (parts[0] + parts[1] + (parts[2] + coord)) / np.float32(half[w])
        field_ += np.float32(lin[w]) * t + np.float32(quad[w]) * t * t
    return np.exp(field_, out=field_)


# ----------------------------------------------------------------------------------------------- case sampling
def _golden_split(offset: float, index: int) -> str:
    """Split name of item ``index`` on a golden-ratio sequence starting at ``offset`` (keeps the split proportions
    even for small n)."""
    u = (offset + index * 0.6180339887498949) % 1.0
    acc = 0.0
    for name, frac in SPLITS:
        acc += frac
        if u < acc:
            return name
    return SPLITS[-1][0]


def split_of(seed: int, index: int) -> str:
    """Split of case ``index``: fixed by (seed, index), independent of n; a golden-ratio sequence keeps
    80/10/10 proportions even for small n."""
    return _golden_split(np.random.default_rng([seed, 1_000_003]).random(), index)


def study_split_of(seed: int, index: int) -> str:
    """Split of multi-series study ``index`` (as :func:`split_of`, with its own offset)."""
    return _golden_split(np.random.default_rng([seed, 1_000_003, _S_STUDY_SPLIT]).random(), index)


def _build_anatomy(region: str, body_half: np.ndarray, body_centre: np.ndarray,
                   rng: np.random.Generator) -> list[Ellipsoid]:
    organs = []
    for name, organ, side, tissue, c, r in ANATOMY[region]:
        is_body = organ == "" and name in ("scalp", "body_fat")
        jit = 0.0 if is_body else 0.025
        centre = body_centre + (np.asarray(c) + rng.uniform(-jit, jit, 3)) * body_half
        radii = np.asarray(r) * body_half * (1.0 if organ in ("brain", "skull", "") else rng.uniform(0.9, 1.08, 3))
        if organ in ("brain", "skull") or name in ("csf_space",):
            rot, wob = np.eye(3), 0.0
        else:
            rot = _rotation(rng, 8.0) if organ not in ("spine",) else np.eye(3)
            wob = float(rng.uniform(0.0, 0.06)) if organ not in ("spine", "ventricles") else 0.0
        organs.append(Ellipsoid(name, tissue, centre, radii, rot, wob, rng.uniform(0, 2 * np.pi, 3), organ, side))
    return organs


def _size_limits(ftype: str, host: Ellipsoid, spacing: np.ndarray) -> tuple[float, float]:
    """(min, max) longest diameter in mm: type range, fits in the host organ, >= one voxel diagonal."""
    lo, hi = FINDING_SIZE_MM[ftype]
    vox_diag = float(np.linalg.norm(spacing)) * 1.1
    hi = min(hi, 0.75 * 2 * float(host.radii.min()))
    lo = max(lo, vox_diag)
    return lo, max(lo, hi)


def _place_finding(ftype: str, host: Ellipsoid, size_mm: float, organs: list[Ellipsoid],
                   placed: list[Ellipsoid], rng: np.random.Generator) -> Ellipsoid | None:
    """An ellipsoid finding of longest diameter ``size_mm`` inside ``host``, not overlapping later-painted
    organs or other findings; None when no place is found."""
    later = organs[organs.index(host) + 1:]
    for _ in range(40):
        radii = size_mm / 2 * np.concatenate([[1.0], rng.uniform(0.75, 1.0, 2)])
        rot = _rotation(rng, 0, full=True)
        d = rng.standard_normal(3)
        d /= np.linalg.norm(d)
        rmax = size_mm / 2
        shrink = max(0.0, 1.0 - rmax / float(host.radii.min()) - 0.08)
        local = d * rng.uniform(0, 1) ** (1 / 3) * shrink
        centre = host.centre + host.rotation @ (local * host.radii)
        cand = Ellipsoid(f"finding-{len(placed)}", ftype, centre, radii, rot, organ=host.organ, side=host.side)
        # sample points on the finding's surface + centre: all inside host, none inside later organs
        pts = centre + (_sphere_points() * radii) @ rot.T
        pts = np.vstack([pts, centre[None]])
        if not host.contains(pts).all():
            continue
        if any(o.contains(pts).any() for o in later if o.organ not in ("",)):
            continue
        if host.organ == "brain" and any(o.contains(pts).any() for o in organs if o.organ == "ventricles"):
            continue
        if any(np.linalg.norm(p.centre - centre) < (p.radii.max() + rmax) * 1.1 for p in placed):
            continue
        return cand
    return None


_SPHERE_PTS: np.ndarray | None = None


def _sphere_points() -> np.ndarray:
    global _SPHERE_PTS
    if _SPHERE_PTS is None:
        g = np.random.default_rng(0).standard_normal((64, 3))
        _SPHERE_PTS = np.vstack([g / np.linalg.norm(g, axis=1, keepdims=True), np.eye(3), -np.eye(3)])
    return _SPHERE_PTS


def _sample_findings(region: str, modality: str, organs: list[Ellipsoid], spacing_bound: np.ndarray,
                     n: int, rng: np.random.Generator, values: dict[str, float]) -> list[Ellipsoid]:
    hosts = [o for o in organs if o.organ in FINDING_SITES]
    findings: list[Ellipsoid] = []
    tries = 0
    while len(findings) < n and tries < 20:
        tries += 1
        host = hosts[int(rng.integers(len(hosts)))]
        types = [t for t in FINDING_SITES[host.organ]
                 if not (modality == "MR" and host.organ == "lung" and t == "calcification")]
        ftype = types[int(rng.integers(len(types)))]
        lo, hi = _size_limits(ftype, host, spacing_bound)
        size = float(rng.uniform(lo, hi))
        f = _place_finding(ftype, host, size, organs, findings, rng)
        if f is not None:
            f.value = _finding_value(ftype, host.organ, modality, values)
            findings.append(f)
    return findings


def _finding_record(k: int, f: Ellipsoid, acq: Acquisition, n_vox: int, geom: Any, midline_x: float
                    ) -> dict[str, Any]:
    """JSON ground truth of one finding (world mm, voxel indices of the stored NIfTI, model grid)."""
    box_w = f.world_box()
    inv = np.linalg.inv(acq.affine)
    corners = np.array(list(itertools.product(*[(box_w[a], box_w[a + 3]) for a in range(3)])))
    v = corners @ inv[:3, :3].T + inv[:3, 3]
    box_v = np.concatenate([v.min(axis=0), v.max(axis=0)])
    centre_v = inv[:3, :3] @ f.centre + inv[:3, 3]
    diam = np.sort(2 * f.radii)[::-1]
    rec = {
        "id": f"f{k}", "type": f.tissue, "organ": f.organ, "side": f.side,
        "body_side": _body_side(float(f.centre[0]), midline_x),
        "location": organ_label(f.organ, f.side), "size_mm": round(float(diam[0]), 1),
        "diameters_mm": _r(diam, 1), "centre_world_mm": _r(f.centre, 2), "box_world_mm": _r(box_w, 2),
        "centre_voxel": _r(centre_v, 2), "box_voxel": _r(box_v, 2), "n_voxels": int(n_vox),
    }
    if geom is not None:
        rec.update(_grid_box_fields(geom, box_w))
    return rec


def _grid_box_fields(geom: Any, box_world: np.ndarray) -> dict[str, Any]:
    """Box on the model grid: continuous grid indices and the 0-99 text box."""
    box_g = np.asarray(geom.box_world_to_grid(box_world), dtype=np.float64)
    box99 = grid_box_to_0_99(box_g, geom.spatial_size)
    return {"box_grid": _r(box_g, 2), "box_0_99": box99, "box_text": format_box_text(box99)}


def grid_box_to_0_99(box_ijk: Sequence[float], spatial_size: Sequence[int]) -> list[int]:
    """Continuous grid box (voxel centres at integers, grid spans [-0.5, n-0.5]) -> ints 0..99."""
    from radfm3d.text.boxes import grid_box_to_normalised

    return [int(v) for v in grid_box_to_normalised(list(map(float, box_ijk)), tuple(spatial_size))]


def format_box_text(box99: Sequence[int]) -> str:
    """``<box>x1,y1,z1,x2,y2,z2</box>`` (:func:`radfm3d.text.boxes.format_box`)."""
    from radfm3d.text.boxes import format_box

    return format_box(tuple(int(v) for v in box99))


def _grid_geometry(acq: Acquisition, grid: Sequence[int] | None) -> Any:
    """GridGeometry of the default recipe (with ``grid`` as spatial_size) for this acquisition, or None."""
    if grid is None:
        return None
    from radfm3d.transforms import PreprocessingRecipe, compute_grid_geometry

    return compute_grid_geometry(acq.affine, acq.shape, PreprocessingRecipe(spatial_size=tuple(grid)))


def _clip_box_to_fov(box: np.ndarray, acq: Acquisition) -> np.ndarray:
    lo, hi = acq.world_extent()
    return np.concatenate([np.maximum(box[:3], lo), np.minimum(box[3:], hi)])


def render_case(seed: int, index: int, *, grid: Sequence[int] | None = (128, 128, 32),
                region: str | None = None, modality: str | None = None, n_findings: int | None = None,
                plane: str | None = None, prior_fraction: float = 0.25, with_prior: bool | None = None,
                dicom_fraction: float = 0.0, matrix: Sequence[int] = (96, 192), slices: Sequence[int] = (24, 64)
                ) -> tuple[PhantomScan, PhantomScan | None, dict[str, Any]]:
    """Render case ``index`` of the phantom set ``seed``.

    Args:
        grid: model grid of the default PreprocessingRecipe used for the 0-99 boxes (None: no grid fields).
        region, modality ("CT", "MR", "T1" or "T2"), n_findings, plane: force these instead of sampling.
        prior_fraction / with_prior: whether the case has a prior scan for comparison.
        dicom_fraction: probability that the case is (also) written as a DICOM series (recorded as ``dicom``).
        matrix, slices: (min, max) in-plane matrix size (multiples of 16) and number of slices; the field of
            view stays >= 110 mm, so small matrices get coarser spacing (tests use tiny ones).

    Returns:
        (current scan, prior scan or None, ground truth dict — JSON-serialisable).
    """
    rng = np.random.default_rng([seed, index, _S_CASE])
    region = region or str(rng.choice(REGIONS))
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    mod_draw, seq_draw = rng.random(), rng.random()
    if modality is None:
        modality, sequence = ("CT", None) if mod_draw < 0.6 else ("MR", "T1" if seq_draw < 0.5 else "T2")
    elif modality.upper() in ("T1", "T2"):
        modality, sequence = "MR", modality.upper()
    elif modality.upper() in ("MR", "MRI"):
        modality, sequence = "MR", "T1" if seq_draw < 0.5 else "T2"
    elif modality.upper() == "CT":
        modality, sequence = "CT", None
    else:
        raise ValueError(f"modality must be CT, MR, T1 or T2, got {modality!r}")
    n_draw = int(rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.25, 0.15]))
    n_findings = n_draw if n_findings is None else int(n_findings)
    prior_draw, dicom_draw = rng.random(), rng.random()
    has_prior = (prior_draw < prior_fraction) if with_prior is None else bool(with_prior)
    dicom = dicom_draw < dicom_fraction

    body_centre = np.array([rng.uniform(-10, 10), rng.uniform(-20, 20), rng.uniform(-150, 150)])
    size_range, slices_range = (int(matrix[0]), int(matrix[1])), (int(slices[0]), int(slices[1]))
    acq = sample_acquisition(np.random.default_rng([seed, index, _S_GEOM]), body_centre, plane, size_range,
                             slices_range)
    lo, hi = acq.world_extent()
    body_half = (hi - lo) * np.asarray(_BODY_FRACTION[region])
    organs = _build_anatomy(region, body_half, body_centre, rng)
    values = _tissue_values(modality, sequence, rng)
    # sizes must exceed the coarsest voxel of the current (and prior) scan: use a 5 mm slice bound for priors
    spacing_bound = acq.spacing if not has_prior else np.maximum(acq.spacing, [1.2, 1.2, 5.0])
    findings = _sample_findings(region, modality, organs, spacing_bound, n_findings, rng, values)

    prior_findings: list[Ellipsoid] = []
    changes: list[dict[str, Any]] = []
    if has_prior:
        prior_findings, changes = _prior_findings(findings, organs, region, modality, spacing_bound, rng, values)

    geom = _grid_geometry(acq, grid)
    arr, labels, counts = render_scan(acq, organs, findings, modality, sequence, values,
                                      np.random.default_rng([seed, index, _S_NOISE]))
    f_recs = [_finding_record(k, f, acq, counts[k], geom, body_centre[0]) for k, f in enumerate(findings)]
    scan = PhantomScan(arr, acq.affine, labels, acq, modality, f_recs)
    case_id = f"case-{index:06d}"
    gt: dict[str, Any] = {
        "case_id": case_id, "seed": int(seed), "index": int(index), "generator_version": GENERATOR_VERSION,
        "split": split_of(seed, index), "modality": modality, "sequence": sequence, "region": region,
        "space": "RAS", "units": "HU" if modality == "CT" else "a.u.", "dicom": bool(dicom),
        "geometry": acq.to_dict(), "body_centre_world_mm": _r(body_centre, 2),
        "organs": [_organ_record(o, acq, geom, body_centre[0]) for o in organs if o.organ],
        "findings": f_recs,
        "grid_geometry": geom.to_dict() if geom is not None else None,
        "prior": None,
    }
    prior_scan = None
    if has_prior:
        pacq = sample_acquisition(np.random.default_rng([seed, index, _S_PRIOR_GEOM]), body_centre, None,
                                  size_range, slices_range)
        # the prior must still cover the anatomy: same FOV scale as the current scan
        pacq = _rescale_to(pacq, acq)
        pgeom = _grid_geometry(pacq, grid)
        parr, plabels, pcounts = render_scan(pacq, organs, prior_findings, modality, sequence, values,
                                             np.random.default_rng([seed, index, _S_PRIOR_NOISE]))
        p_recs = [_finding_record(k, f, pacq, pcounts[k], pgeom, body_centre[0])
                  for k, f in enumerate(prior_findings)]
        prior_scan = PhantomScan(parr, pacq.affine, plabels, pacq, modality, p_recs)
        gt["prior"] = {"geometry": pacq.to_dict(), "findings": p_recs, "changes": changes,
                       "grid_geometry": pgeom.to_dict() if pgeom is not None else None}
    return scan, prior_scan, gt


def render_study(seed: int, index: int, *, grid: Sequence[int] | None = (128, 128, 32), region: str | None = None,
                 n_findings: int | None = None, matrix: Sequence[int] = (96, 192), slices: Sequence[int] = (24, 64),
                 series: Sequence[tuple[str, str | None]] = STUDY_SERIES
                 ) -> tuple[list[PhantomScan], dict[str, Any]]:
    """Render multi-series study ``index`` of the phantom set ``seed``: one anatomy with one set of findings,
    acquired as each of ``series`` (default CT, MR T1, MR T2) with its own geometry, tissue contrast and noise.

    Every series covers the same world field of view (the first series' extent; the others' spacing is rescaled to
    it, as a prior scan's is), so the organ boxes are those of every series. Findings avoid what one of the
    modalities cannot show (no lung calcification when an MR series is present). Random streams are the study's
    own (``[seed, index, 100 + k]``), so studies never change the cases of the same seed.

    Returns:
        (scans in ``series`` order, ground truth: ``study_id``, ``patient_id``, ``split``, ``region``, ``organs``,
        ``findings`` (world boxes; voxel/grid fields of the first series), and ``series``: per series its
        ``modality``, ``sequence``, ``geometry``, ``grid_geometry`` and ``findings`` with that series' voxel and
        grid boxes).
    """
    if not series:
        raise ValueError("a study needs at least one series")
    rng = np.random.default_rng([seed, index, _S_STUDY_CASE])
    region = region or str(rng.choice(REGIONS))
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    n_draw = int(rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.25, 0.15]))
    n_findings = n_draw if n_findings is None else int(n_findings)
    body_centre = np.array([rng.uniform(-10, 10), rng.uniform(-20, 20), rng.uniform(-150, 150)])
    size_range, slices_range = (int(matrix[0]), int(matrix[1])), (int(slices[0]), int(slices[1]))
    acqs = [sample_acquisition(np.random.default_rng([seed, index, _S_STUDY_GEOM + s]), body_centre, None,
                               size_range, slices_range) for s in range(len(series))]
    acqs = [acqs[0]] + [_rescale_to(a, acqs[0]) for a in acqs[1:]]
    lo, hi = acqs[0].world_extent()
    body_half = (hi - lo) * np.asarray(_BODY_FRACTION[region])
    organs = _build_anatomy(region, body_half, body_centre, rng)
    values = [_tissue_values(mod, seq, np.random.default_rng([seed, index, _S_STUDY_VALUES + s]))
              for s, (mod, seq) in enumerate(series)]
    any_mr = any(mod == "MR" for mod, _ in series)
    spacing_bound = np.max([a.spacing for a in acqs], axis=0)
    findings = _sample_findings(region, "MR" if any_mr else "CT", organs, spacing_bound, n_findings, rng, values[0])
    scans: list[PhantomScan] = []
    series_gt: list[dict[str, Any]] = []
    geoms = [_grid_geometry(acq, grid) for acq in acqs]
    for s, ((mod, seq), acq, geom) in enumerate(zip(series, acqs, geoms)):
        own = [dataclasses.replace(f, value=_finding_value(f.tissue, f.organ, mod, values[s])) for f in findings]
        arr, labels, counts = render_scan(acq, organs, own, mod, seq, values[s],
                                          np.random.default_rng([seed, index, _S_STUDY_NOISE + s]))
        f_recs = [_finding_record(k, f, acq, counts[k], geom, body_centre[0]) for k, f in enumerate(own)]
        scans.append(PhantomScan(arr, acq.affine, labels, acq, mod, f_recs))
        series_gt.append({"modality": mod, "sequence": seq, "units": "HU" if mod == "CT" else "a.u.",
                          "geometry": acq.to_dict(), "grid_geometry": geom.to_dict() if geom is not None else None,
                          "findings": f_recs})
    study_id = f"study-{index:06d}"
    gt: dict[str, Any] = {
        "study_id": study_id, "patient_id": f"patient-{study_id}", "case_id": study_id, "seed": int(seed),
        "index": int(index), "generator_version": GENERATOR_VERSION, "split": study_split_of(seed, index),
        "modality": "+".join(dict.fromkeys(mod for mod, _ in series)), "sequence": None, "region": region,
        "space": "RAS", "body_centre_world_mm": _r(body_centre, 2),
        "organs": [_organ_record(o, acqs[0], geoms[0], body_centre[0]) for o in organs if o.organ],
        "findings": series_gt[0]["findings"], "series": series_gt,
    }
    return scans, gt


def _organ_record(o: Ellipsoid, acq: Acquisition, geom: Any, midline_x: float) -> dict[str, Any]:
    """JSON record of an organ: name, side, centre and box (world mm, clipped to the field of view)."""
    box = _clip_box_to_fov(o.world_box(), acq)
    rec = {"structure": o.name, "organ": o.organ, "side": o.side,
           "body_side": "none" if o.organ == "spine" else _body_side(float(o.centre[0]), midline_x),
           "location": organ_label(o.organ, o.side),
           "centre_world_mm": _r(o.centre, 2), "box_world_mm": _r(box, 2)}
    if geom is not None:
        rec.update(_grid_box_fields(geom, box))
    return rec


def _rescale_to(pacq: Acquisition, ref: Acquisition) -> Acquisition:
    """Scale a sampled prior acquisition's spacing so its world extent matches the reference scan's."""
    lo, hi = ref.world_extent()
    plo, phi = pacq.world_extent()
    scale = (hi - lo) / (phi - plo)  # per world axis
    a = pacq.affine.copy()
    for v in range(3):
        w = int(np.argmax(np.abs(a[:3, v])))
        a[w, v] *= scale[w]
    centre_vox = (np.asarray(pacq.shape, dtype=np.float64) - 1) / 2.0
    a[:3, 3] = (lo + hi) / 2 - a[:3, :3] @ centre_vox
    return Acquisition(pacq.shape, a, pacq.plane, pacq.axcodes)


def _prior_findings(findings: list[Ellipsoid], organs: list[Ellipsoid], region: str, modality: str,
                    spacing_bound: np.ndarray, rng: np.random.Generator, values: dict[str, float]
                    ) -> tuple[list[Ellipsoid], list[dict[str, Any]]]:
    """Findings of the prior scan and the change of each (current findings + resolved prior-only ones)."""
    prior: list[Ellipsoid] = []
    changes: list[dict[str, Any]] = []
    for k, f in enumerate(findings):
        change = str(rng.choice(["new", "grown", "shrunk", "stable"], p=[0.25, 0.25, 0.25, 0.25]))
        size = 2 * float(f.radii.max())
        lo_mm, hi_mm = _size_limits(f.tissue, _host_of(f, organs), spacing_bound)
        if change == "grown":
            psize = size / rng.uniform(1.35, 1.8)
            if psize < lo_mm:
                change = "new"
        elif change == "shrunk":
            psize = min(size * rng.uniform(1.35, 1.8), hi_mm * 1.3)
            if psize < size * 1.3:
                change = "stable"
        if change == "new":
            changes.append({"change": "new", "current": f"f{k}", "prior": None, "type": f.tissue, "organ": f.organ,
                            "side": f.side, "size_mm": round(size, 1), "prior_size_mm": None})
            continue
        psize = size if change == "stable" else psize
        pf = Ellipsoid(f"finding-p{len(prior)}", f.tissue, f.centre.copy(), f.radii * (psize / size), f.rotation,
                       organ=f.organ, side=f.side, value=f.value)
        changes.append({"change": change, "current": f"f{k}", "prior": f"f{len(prior)}", "type": f.tissue,
                        "organ": f.organ, "side": f.side, "size_mm": round(size, 1),
                        "prior_size_mm": round(float(2 * pf.radii.max()), 1)})
        prior.append(pf)
    if rng.random() < 0.35 or not findings:
        extra = _sample_findings(region, modality, organs, spacing_bound, 1, rng, values)
        extra = [e for e in extra if all(np.linalg.norm(e.centre - f.centre) > (e.radii.max() + f.radii.max()) * 1.1
                                         for f in findings + prior)]
        for e in extra:
            changes.append({"change": "resolved", "current": None, "prior": f"f{len(prior)}", "type": e.tissue,
                            "organ": e.organ, "side": e.side, "size_mm": None,
                            "prior_size_mm": round(float(2 * e.radii.max()), 1)})
            prior.append(e)
    return prior, changes


def _host_of(f: Ellipsoid, organs: list[Ellipsoid]) -> Ellipsoid:
    return next(o for o in organs if o.organ == f.organ and o.side == f.side)


def make_case(seed: int, index: int, *, grid: Sequence[int] | None = (128, 128, 32), as_metatensor: bool = True,
              **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """In-memory case: (MetaTensor (1, X, Y, Z) with RAS affine — or (array (X, Y, Z), affine) when
    ``as_metatensor=False`` — , ground truth dict). Keyword arguments go to :func:`render_case`."""
    scan, _, gt = render_case(seed, index, grid=grid, **kwargs)
    if as_metatensor:
        return scan.to_metatensor(), gt
    return (scan.array, scan.affine), gt
