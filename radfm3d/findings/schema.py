# Copyright (c) radfm3d contributors. Apache-2.0.
"""The label schema: what the findings heads predict and how the reading writes it, as data (a JSON file).

A schema file (``label_schema.json`` beside a findings model; the phantom benchmark's ships as package data,
:func:`radfm3d.data.phantom_schemas.schema_path`) holds::

    {"format": "radfm3d-label-schema", "version": 1, "name": "...",
     "outputs": ["modality", "region", "total_count", "flags", "structure_present", "structure_box",
                 "finding_present", "finding_count", "finding_type", "finding_box", "finding_size"],   (any subset)
     "max_count": 3,                                  counts are classes 0..max_count
     "modalities": [{"name", "phrase", "case": "CT" | "MR/T1" ...}],   (case: "modality" or "modality/sequence")
     "regions": [{"name", "phrase"}],
     "structures": [{"name", "phrase", "regions": [...], "case": "organ/side"}],
     "finding_types": [{"name", "phrase"}],
     "finding_sites": {region: [[structure, [finding types]], ...]},   the sites a reading lists, in order
     "flags": [{"name", "phrase", "rules": [{"type": ..., "organ": ...}, ...]}],   per-scan abnormality flags
     "phrases": {"prefix", "comma", "semicolon", "period", "none", "filler"}}

Index order of each list is the heads' output order. A schema without ``regions`` reads every site under the
region ``""``; a flag is set for a case when the case lists it in ``"flags"`` or any of its findings matches every
key of one of the flag's rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LabelSchema", "OUTPUTS", "SCHEMA_FILE", "load_schema"]

#: every output a schema may declare
OUTPUTS = ("modality", "region", "total_count", "flags", "structure_present", "structure_box", "finding_present",
           "finding_count", "finding_type", "finding_box", "finding_size")
#: per-structure outputs that need finding types
_FINDING_OUTPUTS = ("finding_type",)
#: file name of the schema beside a model
SCHEMA_FILE = "label_schema.json"
_PHRASE_KEYS = ("prefix", "comma", "semicolon", "period", "none", "filler")
_FORMAT = "radfm3d-label-schema"


def _names(entries: Sequence[Mapping[str, Any]], what: str) -> tuple[str, ...]:
    names = tuple(str(e["name"]) for e in entries)
    if len(set(names)) != len(names):
        raise ValueError(f"label schema: {what} names must be distinct, got {list(names)}")
    return names


class LabelSchema:
    """A validated label schema (see the module docstring). Build with :meth:`from_dict` / :func:`load_schema`."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        data = json.loads(json.dumps(dict(data)))  # a private, JSON-clean copy
        if data.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"label schema: format {data.get('format')!r} is not {_FORMAT!r}")
        unknown = sorted(set(data) - {"format", "version", "name", "description", "outputs", "max_count",
                                      "modalities", "regions", "structures", "finding_types", "finding_sites",
                                      "flags", "phrases"})
        if unknown:
            raise ValueError(f"label schema: unknown keys {unknown}")
        self.data = data
        self.name = str(data.get("name", "custom"))
        self.outputs = tuple(data.get("outputs") or ())
        bad = [o for o in self.outputs if o not in OUTPUTS]
        if bad or not self.outputs:
            raise ValueError(f"label schema: outputs {list(self.outputs)} must be a non-empty subset of {OUTPUTS}")
        self.max_count = int(data.get("max_count", 3))
        if self.max_count < 1:
            raise ValueError(f"label schema: max_count must be >= 1, got {self.max_count}")
        self.modality_entries = list(data.get("modalities") or [])
        self.region_entries = list(data.get("regions") or [])
        self.structure_entries = list(data.get("structures") or [])
        self.type_entries = list(data.get("finding_types") or [])
        self.flag_entries = list(data.get("flags") or [])
        self.modalities = _names(self.modality_entries, "modality")
        self.regions = _names(self.region_entries, "region")
        self.structures = _names(self.structure_entries, "structure")
        self.finding_types = _names(self.type_entries, "finding type")
        self.flags = _names(self.flag_entries, "flag")
        needs = {"modality": self.modalities, "region": self.regions, "flags": self.flags,
                 "structure_present": self.structures, "finding_type": self.finding_types}
        for output, values in needs.items():
            if output in self.outputs and not values:
                raise ValueError(f"label schema: output {output!r} needs a non-empty list for it")
        if any(o.startswith(("structure_", "finding_")) for o in self.outputs) and not self.structures:
            raise ValueError("label schema: per-structure outputs need structures")
        self.phrases = {**{"prefix": " Image reading:", "comma": ",", "semicolon": ";", "period": ".",
                           "none": " no findings", "filler": " "}, **dict(data.get("phrases") or {})}
        unknown_phrases = sorted(set(self.phrases) - set(_PHRASE_KEYS))
        if unknown_phrases:
            raise ValueError(f"label schema: unknown phrase keys {unknown_phrases} (known: {_PHRASE_KEYS})")
        for kind, entries in (("modality", self.modality_entries), ("region", self.region_entries),
                              ("structure", self.structure_entries), ("type", self.type_entries),
                              ("flag", self.flag_entries)):
            for e in entries:
                self.phrases[f"{kind}:{e['name']}"] = str(e.get("phrase", " " + str(e["name"])))
        self.structure_regions = {str(e["name"]): tuple(e.get("regions") or self.regions or ("",))
                                  for e in self.structure_entries}
        self.structure_case = {str(e.get("case", e["name"])): str(e["name"]) for e in self.structure_entries}
        self.modality_case = {str(e.get("case", e["name"])): i for i, e in enumerate(self.modality_entries)}
        sites = data.get("finding_sites") or {}
        self.finding_sites: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}
        if self.has_findings:
            if not self.finding_types:
                raise ValueError("label schema: finding outputs need finding_types")
            region_names = self.regions or ("",)
            if set(sites) != set(region_names):
                raise ValueError(f"label schema: finding_sites needs one entry per region {list(region_names)}, "
                                 f"got {sorted(sites)}")
            for region, entries in sites.items():
                out = []
                for structure, types in entries:
                    if structure not in self.structures:
                        raise ValueError(f"label schema: finding site {structure!r} of region {region!r} is not a "
                                         "structure")
                    unknown_types = [t for t in types if t not in self.finding_types]
                    if not types or unknown_types:
                        raise ValueError(f"label schema: finding site {structure!r} of region {region!r}: types "
                                         f"{types!r} must be non-empty and among {list(self.finding_types)}")
                    out.append((str(structure), tuple(str(t) for t in types)))
                self.finding_sites[str(region)] = tuple(out)
        for structure, regions in self.structure_regions.items():
            if self.regions and any(r not in self.regions for r in regions):
                raise ValueError(f"label schema: structure {structure!r} names unknown regions {list(regions)}")

    # ------------------------------------------------------------------ views
    @property
    def has_findings(self) -> bool:
        """Whether the heads predict per-structure findings (and the reading lists them by site)."""
        return any(o in self.outputs for o in ("finding_present", "finding_type"))

    def has(self, output: str) -> bool:
        return output in self.outputs

    def sites(self, region: int | None) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """The finding sites of region index ``region`` (None: the schema has no regions) as
        ``((structure index, (type indices)), ...)``."""
        name = self.regions[region] if region is not None and self.regions else ""
        return tuple((self.structures.index(s), tuple(self.finding_types.index(t) for t in types))
                     for s, types in self.finding_sites.get(name, ()))

    def all_site_structures(self) -> list[str]:
        """Every structure that is a finding site of some region (schema order)."""
        named = {s for sites in self.finding_sites.values() for s, _ in sites}
        return [s for s in self.structures if s in named]

    def flag_of_finding(self, finding: Mapping[str, Any]) -> list[str]:
        """The flags one finding of a case sets (by the flags' rules)."""
        return [str(e["name"]) for e in self.flag_entries
                if any(all(str(finding.get(k)) == str(v) for k, v in rule.items()) for rule in e.get("rules") or ())]

    def structure_names(self) -> dict[str, str]:
        """Structure -> its words in a reading (the phrase without the leading space)."""
        return {s: self.phrases[f"structure:{s}"].strip() for s in self.structures}

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSchema:
        return cls(data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.data))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schema as JSON (atomically); ``path`` may be a folder (then ``label_schema.json`` in it)."""
        from radfm3d.utils import atomic_write

        path = Path(path)
        if path.is_dir():
            path = path / SCHEMA_FILE
        text = json.dumps(self.data, indent=1) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSchema) and self.data == other.data

    def __repr__(self) -> str:
        return (f"LabelSchema({self.name!r}, outputs={list(self.outputs)}, {len(self.structures)} structures, "
                f"{len(self.finding_types)} finding types, {len(self.flags)} flags)")


def load_schema(source: str | os.PathLike | Mapping[str, Any] | LabelSchema) -> LabelSchema:
    """A :class:`LabelSchema` from a schema object, a dict, a JSON file or a folder holding ``label_schema.json``.
    Raises :class:`radfm3d.errors.RadFM3DInputError` naming the file on a missing or malformed schema."""
    from radfm3d.errors import RadFM3DInputError

    if isinstance(source, LabelSchema):
        return source
    if isinstance(source, Mapping):
        try:
            return LabelSchema(source)
        except (KeyError, TypeError, ValueError) as err:
            raise RadFM3DInputError("label schema", str(err)) from None
    path = Path(source)
    if path.is_dir():
        path = path / SCHEMA_FILE
    if not path.is_file():
        raise RadFM3DInputError(path, "label schema file not found")
    try:
        return LabelSchema(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise RadFM3DInputError(path, f"label schema is not JSON ({err.msg})") from None
    except (KeyError, TypeError, ValueError) as err:
        raise RadFM3DInputError(path, str(err)) from None
