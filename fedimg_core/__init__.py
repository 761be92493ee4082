"""fedimg's ground floor: what every other package may import, and which imports none of them.

- `fedimg_core.errors`: the error family (`FedimgError`, `UserError`, `ConfigError`), each
  error optionally carrying the file and the config key path it is about.
- `fedimg_core.cli`: `run_cli`, which turns a `UserError` into one line and exit code 2.
- `fedimg_core.atomic`: atomic file writes and bounded reads of small operator-named files.
- `fedimg_core.hashing`: file hashing (`sha256_file`).
- `fedimg_core.registry_wire`: the artifact registry's wire constants, shared by the
  coordinator's registry and the site's registry client.
- `fedimg_core.reporting`: the reporting layer (Jinja2 page templates, one stylesheet, the
  matplotlib figure toolkit) of the run, comparison, QC, factory and adaptation reports.

Layering (checked by import-linter, see ``[tool.importlinter]`` in pyproject.toml):
``coordinator`` > ``site_agent`` > ``fedimg_testing`` > ``pipelines`` > ``preprocessing`` >
``fedimg_core``. Besides the standard library it uses click, pydantic (config models), and
Jinja2 and matplotlib (reporting).
"""
