# Copyright (c) radfm3d contributors. Apache-2.0.
"""Label schemas of the RadPhantom cases (``cases.jsonl`` of ``radfm3d phantoms``), shipped as package data.

- ``phantom``: modality, region, 13 structures with boxes, per-structure findings (5 types at 8 sites); the schema of
  the shipped demo model's findings reader.
- ``phantom_flags``: a CT-RATE-like multi-label schema: 15 per-scan abnormality flags, one per (organ, finding type)
  pair the generator writes, set from a case's findings by the flags' rules; no structures, no boxes.
- ``phantom_structures``: modality, region, presence and box of every structure; no findings.

The files are :mod:`radfm3d.findings.schema` JSON; :func:`check_schema` tests one against the generator's tables.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SCHEMA_DIR", "SCHEMAS", "schema_path", "check_schema"]

SCHEMA_DIR = Path(__file__).resolve().parent / "phantom_schemas"
SCHEMAS = ("phantom", "phantom_flags", "phantom_structures")


def schema_path(name: str = "phantom") -> Path:
    """Path of a shipped phantom schema file (``name`` one of :data:`SCHEMAS`)."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown phantom label schema {name!r}; expected one of {SCHEMAS}")
    return SCHEMA_DIR / f"{name}.json"


def check_schema(name: str = "phantom") -> list[str]:
    """Differences between a shipped schema file and the generator's public tables (``REGIONS``, ``FINDING_TYPES``,
    ``FINDING_SITES``, ``REGION_FINDING_ORGANS``, ``organ_label``); empty when they agree."""
    import json

    from radfm3d.data.phantoms import FINDING_SITES, FINDING_TYPES, REGION_FINDING_ORGANS, REGIONS, organ_label

    data = json.loads(schema_path(name).read_text())
    problems = []
    regions = [r["name"] for r in data.get("regions", [])]
    if regions and regions != list(REGIONS):
        problems.append(f"regions {regions} != {list(REGIONS)}")
    types = [t["name"] for t in data.get("finding_types", [])]
    if types and types != list(FINDING_TYPES):
        problems.append(f"finding types {types} != {list(FINDING_TYPES)}")
    by_case = {s.get("case"): s for s in data.get("structures", [])}
    for region, sites in (data.get("finding_sites") or {}).items():
        want = [(organ, side) for organ, side in REGION_FINDING_ORGANS[region]]
        names = {s["name"]: s for s in data["structures"]}
        got = [tuple(names[s]["case"].split("/")) for s, _ in sites]
        if got != want:
            problems.append(f"finding sites of {region}: {got} != {want}")
        for structure, site_types in sites:
            organ = names[structure]["case"].split("/")[0]
            if list(site_types) != list(FINDING_SITES[organ]):
                problems.append(f"site {structure}: types {site_types} != {list(FINDING_SITES[organ])}")
    for case, entry in by_case.items():
        if case and "/" in case:
            organ, side = case.split("/")
            if entry["phrase"].strip() != organ_label(organ, side):
                problems.append(f"structure {entry['name']}: phrase {entry['phrase']!r} != "
                                f"{organ_label(organ, side)!r}")
    for flag in data.get("flags", []):
        for rule in flag.get("rules", []):
            if rule.get("type") not in FINDING_TYPES or rule.get("organ") not in FINDING_SITES \
                    or rule["type"] not in FINDING_SITES[rule["organ"]]:
                problems.append(f"flag {flag['name']}: rule {rule} names no finding the generator writes")
    return problems
