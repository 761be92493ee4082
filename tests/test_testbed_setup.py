"""Testbed site setup: the out-of-federation set follows the federation's modality, and a
reused workdir never serves the phantom of earlier settings (no node process is started)."""

import json

from coordinator.testbed import TAG, Testbed
from site_agent import node


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_reused_workdir_follows_the_modality_and_phase(tmp_path):
    mr = Testbed(tmp_path, n_sites=1, modalities=["MR"], classes=["liver"], oof_phase="non_contrast")
    mr.setup_sites()
    assert mr.oof_dataset == tmp_path / "out-of-federation" / "mr"
    assert _manifest(mr.oof_dataset)["modality"] == "MR"  # an MR federation is tested on MR
    assert _manifest(mr.dataset_dir(0))["modality"] == "MR"
    mr_case = sorted((mr.oof_dataset / "imagesTr").iterdir())[0].stat().st_mtime_ns

    # the same settings again: nothing is rewritten
    Testbed(tmp_path, n_sites=1, modalities=["MR"], classes=["liver"], oof_phase="non_contrast").setup_sites()
    assert sorted((mr.oof_dataset / "imagesTr").iterdir())[0].stat().st_mtime_ns == mr_case

    ct = Testbed(tmp_path, n_sites=1, modalities=["CT"], classes=["liver"], oof_phase="arterial")
    ct.setup_sites()
    assert _manifest(ct.dataset_dir(0))["modality"] == "CT"
    assert _manifest(ct.oof_dataset)["modality"] == "CT"
    hospital = json.loads((ct.sites[0].data_dir.parent / "hospital" / "testbed-phantom.json").read_text())
    assert hospital["modality"] == "CT"  # the MR phantom was replaced, not reused under the CT name
    # the node serves the CT dataset only; the MR one is unregistered
    served = [d for d in node.list_datasets(ct.sites[0]) if TAG in d.tags]
    assert [d.path for d in served] == [str(ct.dataset_dir(0))]
