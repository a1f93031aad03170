# Copyright (c) radfm3d contributors. Apache-2.0.
from __future__ import annotations


def test_demo_example_scans_read_back(tmp_path):
    from radfm3d.demo import EXAMPLES, make_example_scans
    from radfm3d.io import load_image

    paths = make_example_scans(tmp_path)
    assert [p.name for p in paths] == [example[0] for example in EXAMPLES]
    formats = {load_image(p).meta["source_format"] for p in paths}
    assert formats == {"nifti", "dicom-series"}
    assert all((tmp_path / f"{p.name}.truth.json").is_file() for p in paths)
