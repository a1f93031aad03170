# Copyright (c) radfm3d contributors. Apache-2.0.
"""radfm3d: a MONAI-native toolkit for 3D radiology vision-language models.

Public API (imported lazily, so `import radfm3d` stays light)::

    from radfm3d import load_image, PreprocessingRecipe, RadFM3DProcessor, RadFM3DForCausalLM
"""

from __future__ import annotations


from radfm3d.utils import lazy_exports

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "RadFM3DError": "radfm3d.errors",
    "RadFM3DInputError": "radfm3d.errors",
    "load_image": "radfm3d.io",
    "save_nifti": "radfm3d.io",
    "save_dicom_series": "radfm3d.io",
    "PreprocessingRecipe": "radfm3d.transforms",
    "GridGeometry": "radfm3d.transforms",
    "preprocess": "radfm3d.transforms",
    "RadFM3DProcessor": "radfm3d.processing",
    "RadFM3DConfig": "radfm3d.modeling.configuration",
    "RadFM3DForCausalLM": "radfm3d.modeling.model",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_exports("radfm3d", _EXPORTS)
