"""The specs package: spec files → validated specs, the first step of every pass.

Public names are re-exported here, so callers import ``from reconciler.specs``
and not from the module that happens to hold a name today.
"""

from reconciler.limits import DEFAULT_MODELS
from reconciler.specs.files import (
    MAX_SPEC_BYTES,
    RACY_NS,
    YOUNG,
    Look,
    Observation,
    Settling,
    SpecScan,
    is_spec_candidate,
    load_spec_file,
    observe,
    same_file,
    scan_specs,
    stamp,
)
from reconciler.specs.formats import SPEC_SUFFIXES
from reconciler.specs.rules import SpecFile, TrackSpec, parse_spec

__all__ = [
    "DEFAULT_MODELS",
    "MAX_SPEC_BYTES",
    "RACY_NS",
    "SPEC_SUFFIXES",
    "YOUNG",
    "Look",
    "Observation",
    "Settling",
    "SpecFile",
    "SpecScan",
    "TrackSpec",
    "is_spec_candidate",
    "load_spec_file",
    "observe",
    "parse_spec",
    "same_file",
    "scan_specs",
    "stamp",
]
