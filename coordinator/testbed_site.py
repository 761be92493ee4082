"""One testbed site's chores, run as its own process (as a hospital's staff would):

    python -m coordinator.testbed_site setup   --config C --seed S [...]   # init + phantom DICOM + prepare + register
                                                                        # (+ test-only reference labels; --no-reference-labels: none)
    python -m coordinator.testbed_site approve --config C                   # approve every plan sent (loop)
    python -m coordinator.testbed_site data    --out DIR --seed S --classes kidney,liver --phase P [--modality MR]  # a test set only
    python -m coordinator.testbed_site setup   --config C --seed S --body chest [...]  # a radiograph site (CR/DX, structure by seed)
    python -m coordinator.testbed_site setup   --config C --seed S --brain site-a --labelled 2 [...]  # a FedSR site: brain MRI,
                                                                        # unlabelled but for --labelled evaluation cases

The testbed runs these in separate processes so each site's Fed-BioMed state (its
logger, its database) stays in a process of its own, like on a real site.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedimg_core import atomic
from fedimg_testing.phantom import SITES, write_phantom_site
from preprocessing.schema import load_schema
from site_agent import config as site_config


def setup(args) -> None:
    """Create the site like its staff would: config + node, then the hospital's "own" data
    (phantom DICOM series with planted identifiers, labels for this site's organs only, and
    test-only reference labels of the other organ groups unless ``--no-reference-labels``),
    `site-agent prepare` on it (the real CLI, in its own process), and registration."""
    from site_agent import node  # deferred: start-up time (Fed-BioMed's node; the `data` step needs none)

    base = Path(args.config).resolve().parent
    site = site_config.validate(
        {
            "site_name": args.name,
            "coordinator": {"host": args.host, "port": args.port},
            "data_dir": str(base / "data"),
            "work_dir": str(base / "work"),
            "runtime": "process",
            "device": args.device,
        },
        "testbed",
    )
    site.work_dir.mkdir(parents=True, exist_ok=True)
    node.create_node(site)
    site.save(args.config)
    site = site_config.load(args.config)
    classes = args.classes.split(",") if args.classes else None
    if getattr(args, "body", "abdomen") == "chest":
        dataset = site.data_dir / "chest"
        _drop_stale(base / "hospital", dataset, _chest_params(args))
        if not (dataset / "manifest.json").exists():
            _prepare_chest(args, base / "hospital", dataset)
    elif getattr(args, "brain", None):
        dataset = site.data_dir / "brain"
        _drop_stale(base / "hospital", dataset, _brain_params(args))
        if not (dataset / "manifest.json").exists():
            _prepare_brain(args, base / "hospital", dataset)
    else:
        dataset = site.data_dir / args.modality.lower()
        _drop_stale(base / "hospital", dataset, _phantom_params(args, classes))
        if not (dataset / "manifest.json").exists():
            _prepare_phantom(args, base / "hospital", dataset, classes=classes)
    # a reused workdir may hold another modality's dataset registered: the node serves this one
    for entry in node.list_datasets(site):
        if args.tag in entry.tags and Path(entry.path).resolve() != dataset.resolve():
            node.remove_dataset(site, entry.dataset_id)
    if not any(Path(e.path).resolve() == dataset.resolve() for e in node.list_datasets(site)):
        node.add_dataset(site, dataset, [args.tag], allow_unlabelled=bool(getattr(args, "brain", None)))  # FedSR trains on images only


PARAMS_FILE = "testbed-phantom.json"


def _phantom_params(args, classes: list[str] | None) -> dict:
    """What the phantom hospital's content depends on (reference labels named only when on, so
    a workdir written before they existed keeps its out-of-federation set)."""
    params = {"modality": args.modality, "phase": args.phase, "seed": args.seed, "cases": args.cases, "size": args.size,
              "organs": getattr(args, "organs", None), "classes": classes}  # fmt: skip
    if getattr(args, "reference_labels", False):
        params["reference_labels"] = True
    return params


def _chest_params(args) -> dict:
    """What decides a chest site's phantom (a reused workdir with other values is written again)."""
    return {"body": "chest", "seed": args.seed, "cases": args.cases, "scale": args.chest_scale, "references": _chest_references(args)}


def _chest_references(args) -> list[str]:
    """The test-only reference classes of a chest site: the paper's (`CHEST_REFERENCES`), none with ``--no-reference-labels``."""
    return list(CHEST_REFERENCES[(args.seed - 1) % len(CHEST_REFERENCES)]) if args.reference_labels else []


def _prepare_chest(args, hospital: Path, dataset: Path) -> None:
    """A radiograph site (`fedimg_testing.phantom.chest`), after the ConDistFL paper's 2D setting: site i has
    scanner i and labels structure i (left lung, right lung, heart, pneumothorax; cycled), and holds test-only
    reference masks of the structures the paper's dataset of that kind held (`CHEST_REFERENCES`); prepared with
    the chest-xr schema by the real `site-agent prepare`."""
    from fedimg_testing.phantom import CHEST_SCANNERS as SCANNERS
    from fedimg_testing.phantom import write_chest_site

    index = (args.seed - 1) % len(SCANNERS)
    classes = CHEST_SITES[index]
    reference = _chest_references(args)
    if not (hospital / "site-labels.yaml").exists():
        write_chest_site(hospital, seed=args.seed, n_cases=args.cases, scanner=SCANNERS[index], classes=classes,
                         reference_classes=reference or None, scale=args.chest_scale, pneumothorax=0.5)  # fmt: skip
        atomic.write_json(hospital / PARAMS_FILE, _chest_params(args))
    cmd = [
        str(Path(sys.executable).with_name("site-agent")), "prepare", str(hospital / "images"), "--schema", "chest-xr",
        "--labels", str(hospital / "labels"), "--label-map", str(hospital / "site-labels.yaml"),
        "--out", str(dataset), "--name", f"{args.name}-{classes[0]}-{SCANNERS[index].modality.lower()}", "--require-labels",
    ]  # fmt: skip
    if reference:
        cmd += ["--reference-labels", str(hospital / "reference-labels"), "--reference-label-map", str(hospital / "reference-labels.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"site-agent prepare failed ({res.returncode}): {res.stderr.strip() or res.stdout[-500:]}")


# The ConDistFL paper's 2D sites: Montgomery (left lung), Shenzhen (right lung), JSRT (heart), SIIM-ACR (pneumothorax).
CHEST_SITES = (["left_lung"], ["right_lung"], ["heart"], ["pneumothorax"])
# Their test-only labels (the paper's Table 3): Montgomery's right lung, Shenzhen's left lung, JSRT's two lungs; SIIM-ACR none.
# (A pneumothorax reference would mostly be empty masks that an empty prediction scores 1 on: it would measure nothing.)
CHEST_REFERENCES: tuple[list[str], ...] = (["right_lung"], ["left_lung"], ["left_lung", "right_lung"], [])


def _brain_params(args) -> dict:
    """What a FedSR phantom site's content depends on."""
    return {"brain": args.brain, "seed": args.seed, "cases": args.cases, "labelled": args.labelled, "size": args.brain_size}


def _prepare_brain(args, hospital: Path, dataset: Path) -> None:
    """A FedSR site's brain MRI (`fedimg_testing.phantom.brain`): `--cases` subjects scanned with
    the `--brain` site profile, the last `--labelled` of them with labels (evaluation cases),
    prepared with the brain-mri schema by the real `site-agent prepare`."""
    from fedimg_testing.phantom import write_brain_site

    if not (hospital / "dicom").is_dir():
        labelled = list(range(args.cases - args.labelled, args.cases)) if args.labelled else False
        size = args.brain_size
        write_brain_site(hospital, args.brain, n_cases=args.cases, seed=1000 * args.seed, labelled=labelled, shape=(size, size, size))
        atomic.write_json(hospital / PARAMS_FILE, _brain_params(args))
    cmd = [str(Path(sys.executable).with_name("site-agent")), "prepare", str(hospital / "dicom"), "--schema", "brain-mri",
           "--out", str(dataset), "--name", f"{args.name}-brain"]  # fmt: skip
    if args.labelled:
        cmd += ["--labels", str(hospital / "labels"), "--label-map", str(hospital / "site-labels.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"site-agent prepare failed ({res.returncode}): {res.stderr.strip() or res.stdout[-500:]}")


def reference_classes_for(organs: list[str]) -> list[str]:
    """The classes a phantom site holds test-only reference labels of: every class of the schema
    whose organ group the site does not label (the organ and its lesions).

    Args:
        organs: the classes the site labels.

    Returns:
        The schema's foreground classes outside the site's organ groups, in schema id order.
    """
    schema = load_schema(None)
    return [c for c, _ in sorted(schema.classes.items(), key=lambda kv: kv[1]) if c != "background" and c not in organs and schema.organ_of(c) not in organs]


def _drop_stale(hospital: Path, dataset: Path, params: dict) -> None:
    """A testbed workdir reused with other settings (say CT then MR) must not serve the old
    phantom: its hospital folder and prepared dataset (testbed-generated demo data, nothing
    else) are removed when their recorded parameters differ, and written again."""
    record = hospital / PARAMS_FILE
    try:
        old = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, ValueError):
        old = {}
    if old == params or (old is None and not hospital.exists()):
        return
    for folder in (hospital, dataset):
        if folder.exists():
            shutil.rmtree(folder)


def _prepare_phantom(args, hospital: Path, dataset: Path, classes: list[str] | None = None) -> None:
    organs = classes or (SITES[args.organs] if args.organs else list(SITES.values())[(args.seed - 1) % len(SITES)])
    reference = reference_classes_for(organs) if getattr(args, "reference_labels", False) else []
    if not (hospital / "site-labels.yaml").exists():
        write_phantom_site(
            hospital, organs, n_cases=args.cases, seed=args.seed, phase=args.phase, modality=args.modality,
            shape=(args.size, args.size, max(16, args.size // 2)), spacing=(2.0, 2.0, 3.0), reference_classes=reference or None,
        )  # fmt: skip
        atomic.write_json(hospital / PARAMS_FILE, _phantom_params(args, classes))
    cmd = [
        str(Path(sys.executable).with_name("site-agent")), "prepare", str(hospital / "dicom"),
        "--labels", str(hospital / "labels"), "--label-map", str(hospital / "site-labels.yaml"),
        "--out", str(dataset), "--name", f"{args.name}-{organs[0] if classes is None else args.phase}-{args.modality.lower()}", "--require-labels",
    ]  # fmt: skip
    if reference:  # test-only: scored on the site's test cases, never trained on
        cmd += ["--reference-labels", str(hospital / "reference-labels"), "--reference-label-map", str(hospital / "reference-label-map.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"site-agent prepare failed ({res.returncode}): {res.stderr.strip() or res.stdout[-500:]}")


def data(args) -> None:
    """A labelled dataset that belongs to no node: the out-of-federation test set."""
    out = Path(args.out).resolve()
    classes = args.classes.split(",")
    hospital = out.parent / f"{out.name}-hospital"
    _drop_stale(hospital, out, _phantom_params(args, classes))
    if not (out / "manifest.json").exists():
        _prepare_phantom(args, hospital, out, classes=classes)


def approve(args) -> None:
    """Approve every pending training plan of a site, forever (the testbed's stand-in for its staff).

    Args:
        args: the parsed ``approve`` arguments (``config``).
    """
    from site_agent import node

    site = site_config.load(args.config)
    while True:
        for plan in node.list_plans(site, status="Pending"):
            node.set_plan_status(site, plan["id"], approve=True, note="testbed auto-approval")
            print(f"{site.site_name}: approved {plan['name']} (sha256 {plan['hash'][:16]}...)", flush=True)
        time.sleep(0.5)


def main(argv=None) -> int:
    """Run a testbed site step: ``setup``, ``data`` or ``approve``.

    Args:
        argv: the command line (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    p = argparse.ArgumentParser(prog="python -m coordinator.testbed_site")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--config", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--host", default="localhost")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--cases", type=int, default=4)
    s.add_argument("--size", type=int, default=48, help="in-plane voxels of the phantom CT (slices: half)")
    s.add_argument("--phase", default="portal_venous", help="contrast phase of the site's scanner protocol")
    s.add_argument("--organs", default=None, help="organ group the site labels (default: by seed)")
    s.add_argument("--classes", default=None, help="classes the site labels, comma-separated (instead of an organ group)")
    s.add_argument("--modality", default="CT", choices=("CT", "MR"), help="the site's scanner: CT, or MR (same anatomy, MR-like intensities)")
    s.add_argument(
        "--body", default="abdomen", choices=("abdomen", "chest"), help="abdominal CT/MR phantom, or chest radiographs (CR/DX; by seed: scanner and structure)"
    )
    s.add_argument("--chest-scale", type=float, default=0.1, help="chest sites: matrix size relative to the scanner's (0.1: ~1.5-2 mm pixels)")
    s.add_argument("--brain", default=None, help="a FedSR site: brain MRI with this scanner profile (site-a, site-b, site-c, site-d)")
    s.add_argument("--labelled", type=int, default=0, help="brain sites: how many cases have labels (evaluation cases, never trained on)")
    s.add_argument("--brain-size", type=int, default=32, help="brain sites: voxels per axis of the phantom head (192 mm field of view)")
    s.add_argument("--tag", default="fedimg-demo")
    s.add_argument("--device", default="auto", help="the site's device setting: auto, cpu, cuda or cuda:N")
    s.add_argument(
        "--no-reference-labels", dest="reference_labels", action="store_false",
        help="no test-only reference labels (by default the site holds them for every organ group it does not label)",
    )  # fmt: skip
    a = sub.add_parser("approve")
    a.add_argument("--config", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", required=True)
    d.add_argument("--name", default="oof")
    d.add_argument("--seed", type=int, required=True)
    d.add_argument("--cases", type=int, default=4)
    d.add_argument("--size", type=int, default=48)
    d.add_argument("--phase", default="non_contrast")
    d.add_argument("--classes", default="kidney,liver,pancreas,spleen", help="classes the test set labels (comma-separated)")
    d.add_argument("--modality", default="CT", choices=("CT", "MR"))
    d.set_defaults(organs=None, reference_labels=False)
    args = p.parse_args(argv)
    try:
        {"setup": setup, "approve": approve, "data": data}[args.cmd](args)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
