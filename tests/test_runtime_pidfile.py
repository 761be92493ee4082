"""The process runtime only ever signals the node it started."""

import json
import os
import subprocess
import sys

from site_agent import config as site_config
from site_agent.runtime import ProcessRuntime, _pid_record


def _site(tmp_path, site_yaml):
    site = site_config.validate(site_yaml, "t")
    site.work_dir.mkdir(parents=True)
    return site


def test_pid_file_from_another_namespace_is_not_ours(tmp_path, site_yaml):
    # What the site container writes into the shared work dir: pid 1, with the container's start time.
    site = _site(tmp_path, site_yaml)
    site.pid_file.write_text(json.dumps({"pid": 1, "create_time": 1.0, "started": "x"}))
    rt = ProcessRuntime(site)
    assert rt.status().running is False
    assert rt.owns_running_node() is False
    assert rt.stop().running is False  # and nothing was signalled: we are still here


def test_reused_pid_is_left_alone(tmp_path, site_yaml):
    site = _site(tmp_path, site_yaml)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = _pid_record(other.pid)
        record["create_time"] -= 100.0  # the recorded node started earlier: this is another process
        site.pid_file.write_text(json.dumps(record))
        ProcessRuntime(site).stop(timeout=1)
        assert other.poll() is None  # not killed
        site.pid_file.write_text(json.dumps(_pid_record(other.pid)))
        assert ProcessRuntime(site).status().running is True
        ProcessRuntime(site).stop(timeout=5)
        assert other.wait(timeout=5) is not None
    finally:
        if other.poll() is None:
            other.kill()
    assert os.path.exists(site.pid_file) is False


def test_a_pid_file_that_is_not_a_record_means_not_started(tmp_path, site_yaml):
    # e.g. a bare pid another tool wrote: no record of ours, so nothing runs that we started (no crash)
    site = _site(tmp_path, site_yaml)
    site.pid_file.write_text("12345\n")
    rt = ProcessRuntime(site)
    assert rt.status().running is False and rt.status().detail == "not started"
    assert rt.owns_running_node() is False
    assert rt.stop().running is False
