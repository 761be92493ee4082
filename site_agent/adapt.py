"""`site-agent adapt source|target` and `site-agent infer`: local domain adaptation on the
federation's data factory, run by a site whenever it chooses (no federation round).

What moves, and only this: the factory is pulled from the coordinator's registry; a source
site pushes its segmentation branch (weights + a JSON config, validated by the coordinator,
which rebuilds the branch and refuses anything else); a target site pulls a branch. Images,
labels, the encoders, the target branch, the reports and the models stay in the site's work
folder. Jobs live in ``<work_dir>/adapt/<job>/`` (see pipelines/adaptation/jobs.py) and
continue from their checkpoint when started again with the same settings.

The source job is in `site_agent.adapt_source`, the target job in `site_agent.adapt_target`,
inference in `site_agent.infer` and what they share in `site_agent.adapt_common`; this
module re-exports them (the import path the commands and tests use).
Pulls are staged (`site_agent.registry_staging.StagedPulls`): they reach
``<work_dir>/models/registry`` only when the command succeeds. A job loads executable
artifacts (a TorchScript perceptual network) only when the site approved their sha256
(``site-agent artifacts``; `pipelines.artifact_approval`).
"""

from __future__ import annotations

# Imported only when an adapt or infer command runs (site_agent.commands.adapt defers it):
# these modules import torch and the adaptation library at the top.
from site_agent.adapt_common import BRANCH_KIND, parse_ref, pull_branch, pull_factory, staged_pulls
from site_agent.adapt_source import run_source
from site_agent.adapt_target import run_target
from site_agent.infer import run_infer, schema_name

__all__ = ["BRANCH_KIND", "parse_ref", "pull_branch", "pull_factory", "run_infer", "run_source", "run_target", "schema_name", "staged_pulls"]
