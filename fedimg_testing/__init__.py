"""Test tooling: deterministic data for tests, demos, the testbed and benchmarks.

- `fedimg_testing.phantom`: abdominal-CT phantoms as DICOM series, NIfTI and label maps,
  with planted identifiers for the de-identification tests.
- `fedimg_testing.synthetic`: blob volumes of known class, and prepared datasets of them.
- `fedimg_testing.public_dicom`: real DICOM series from public packages, fetched at pinned
  versions into a cache (`scripts/fetch_public_dicom.py` is its command line).

Production code (`preprocessing`, `pipelines`, `site_agent`) never imports this package;
only the coordinator's testbed (`coordinator.testbed_site`, `coordinator testbed`) and the
tests do (checked by import-linter, see ``[tool.importlinter]`` in pyproject.toml).
"""
