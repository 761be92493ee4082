"""The data factory on a real federation: 3 Fed-BioMed node processes scanned in three
contrast phases, a coordinator process, the tiny configuration, 2 of 3 sites per round."""

import json

import pytest
import torch
import yaml
from conftest import cli

from coordinator.registry import Registry
from coordinator.testbed import Testbed
from pipelines.sampling import sample_sites
from site_agent.runtime import pid_alive

pytestmark = pytest.mark.integration

ROUNDS = 3
PHASES = ["arterial", "portal_venous", "delayed"]


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("factory"), n_sites=3, phases=PHASES)
    bed.setup_sites()
    bed.start_nodes()
    try:
        home = bed.workdir / "coordinator"
        raw = {
            "name": "factory-it",
            "plan": "data_factory",
            "sites": {"tags": ["fedimg-demo"], "min_sites": 3, "wait_s": 90},
            "rounds": ROUNDS,
            "local_steps": 8,  # 4 D + 4 G updates: R1 at D step 0, path length at G steps 0
            "batch_size": 4,
            "clients_per_round": 2,
            "seed": 3,
            "plan_args": {
                "factory": {"preset": "tiny", "w_offset": True},  # issue 25's options, over the real transport
                "local_discriminator": "projection",
                "refine_rounds": 1,
                "sample_every": 2,
                "r1_interval": 2,
                "pl_interval": 2,
                "mismatch_weight": 0.5,
                "diff_augment": {"translation": 0.1},
            },
            "approval": {"request": True, "wait_s": 60},  # the testbed's sites approve automatically
        }
        spec = bed.workdir / "factory.yaml"
        spec.write_text(yaml.safe_dump(raw))
        res = cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port,
                  "--public-host", "localhost", timeout=500)  # fmt: skip
        (run_dir,) = sorted((home / "runs").iterdir())
        yield bed, home, run_dir, res
    finally:
        bed.teardown()
        assert not [p for p in bed.pids() if pid_alive(p)]


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_factory_rounds_sample_two_of_three_sites(factory_run):
    bed, home, run_dir, res = factory_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, ROUNDS + 1))
    names = sorted(s.site_name for s in bed.sites)
    assert sorted(metrics["clients"]) == names and sorted(metrics["clients"].values()) == [0, 1, 2]
    node_of = {row["name"]: nid for r in metrics["rounds"] for nid, row in r["sites"].items()}
    log = (run_dir / "run.log").read_text()
    for r in metrics["rounds"]:
        assert len(r["sampled"]) == 2 and set(r["sampled"]) <= set(names)
        # exactly the sampled sites trained and reported, with their own client id
        assert sorted(row["name"] for row in r["sites"].values()) == r["sampled"]
        for row in r["sites"].values():
            t = row["train"]
            assert t["client_id"] == metrics["clients"][row["name"]]
            assert t["updates"] > 0
            for key in ("d_loss", "g_loss", "r1", "pl_penalty"):
                assert key in t and t[key] == t[key], key
        assert "sampled 2 of 3 sites" in log
    # seeded: the draw is the one the strategy makes for this seed, round by round
    if len(node_of) == 3:
        for r in metrics["rounds"]:
            expected = sample_sites(list(node_of.values()), 2, 3, r["round"] - 1)
            assert sorted(r["sampled"]) == sorted(n for n, nid in node_of.items() if nid in expected)
    # the last round is the refinement stage (key-alignment loss on key updates)
    last = metrics["rounds"][-1]["sites"].values()
    assert all(row["train"]["refine"] == 1.0 for row in last)
    # all sites use the same key function (same weight checksum)
    sums = {row["train"]["key_checksum32"] for r in metrics["rounds"] for row in r["sites"].values()}
    assert len(sums) == 1 and sums.pop() > 0


def test_site_state_persists_between_the_rounds_a_site_is_sampled(factory_run):
    bed, home, run_dir, res = factory_run
    metrics = _metrics(run_dir)
    seen: dict[str, int] = {}
    restored_checked = 0
    for r in metrics["rounds"]:
        for row in r["sites"].values():
            t = row["train"]
            if row["name"] in seen:
                # moments, step counters and the path-length mean continue from the last round
                assert t["state_restored"] == 1.0
                assert t["updates"] == seen[row["name"]] + 8
                restored_checked += 1
            else:
                assert t["state_restored"] == 0.0 and t["updates"] == 8
            seen[row["name"]] = int(t["updates"])
            assert t["key_layers_restored"] == t["state_restored"]
    assert restored_checked >= 1  # 3 rounds x 2 of 3 sites: some site is sampled twice


def test_key_never_leaves_the_site(factory_run):
    bed, home, run_dir, res = factory_run
    keys = []
    for site in bed.sites:
        files = list((site.work_dir / "cache" / "factory-keys").glob(f"{run_dir.name}-domain-key.pt"))
        if files:
            keys.append(torch.load(files[0])["key"].float().contiguous())
    assert len(keys) >= 2  # every sampled site computed its key
    ckpt = torch.load(run_dir / "checkpoints" / f"global_round_{ROUNDS:04d}.pt")
    n_params = sum(t.numel() for t in ckpt.values())
    # what came back is G, D and G_ema parameters and nothing else
    assert {k.split(".")[0] for k in ckpt} == {"generator", "discriminator", "g_ema"}
    assert metrics_model(run_dir)["parameters"] == n_params
    # the layers that read the key (their updates would carry its sign pattern) never left a
    # site: no reply holds them, and the coordinator's copy is still the round-0 one
    from fedbiomed.common.serializer import Serializer

    from pipelines.factory.training import is_key_pathway, parse_factory_args, site_local_predicate
    from pipelines.wire import decode_params

    is_local = site_local_predicate(parse_factory_args({"local_discriminator": "projection"}))
    replies = [decode_params(r) for r in map(Serializer.load, sorted((run_dir / "fedbiomed").glob("params_NODE_*.mpk"))) if r is not None]
    assert len(replies) == 2 * ROUNDS  # the parameters each sampled site sent, kept by Fed-BioMed (checked and decoded: pipelines.wire)
    for reply in replies:
        names = set(reply)
        assert names and not any(is_local(n) for n in names)  # key layers and D's client-id projection stay at the site
        assert any(n.startswith("generator.") for n in names) and any(n.startswith("g_ema.") for n in names)
    c0 = torch.load(run_dir / "checkpoints" / "global_round_0000.pt")
    local_names = [n for n in ckpt if is_local(n)]
    assert any(map(is_key_pathway, local_names)) and "discriminator.label_embed.weight" in local_names
    assert all(torch.equal(c0[n], ckpt[n]) for n in local_names)
    site_layers = [torch.load(p) for s in bed.sites for p in (s.work_dir / "cache" / "factory-keys").glob(f"{run_dir.name}-key-layers.pt")]
    assert len(site_layers) >= 2
    for layers in site_layers:  # each site's own, trained, from a secret start
        assert set(layers) == set(local_names) and any(not torch.equal(layers[n], c0[n]) for n in local_names)
    # no stored byte on the coordinator side (breakpoints with the sites' replies, logs,
    # metrics, checkpoints, the registry) holds a site's key
    stored = [p for p in home.rglob("*") if p.is_file()]
    blobs = [p.read_bytes() for p in stored]
    for key in keys:
        needle = key.numpy().tobytes()[:64]  # the first 16 float32 values
        assert not any(needle in b for b in blobs)
        # nor any tensor of the checkpoints close to it
        for t in ckpt.values():
            flat = t.flatten().float()
            if flat.numel() >= key.numel():
                assert not torch.allclose(flat[: key.numel()], key, atol=1e-4)
    # site metrics carry numbers only, none of them the key vector
    for r in _metrics(run_dir)["rounds"]:
        for row in r["sites"].values():
            assert all(isinstance(v, (int, float)) for v in row["train"].values())


def metrics_model(run_dir):
    return _metrics(run_dir)["model"]


def test_outputs_samples_and_published_factory(factory_run):
    bed, home, run_dir, res = factory_run
    metrics = _metrics(run_dir)
    assert (run_dir / "samples" / "round_0002.png").is_file() and (run_dir / f"samples/round_{ROUNDS:04d}.png").is_file()
    assert (run_dir / "samples" / "losses.png").is_file()
    # checkpoints kept at sample rounds and the last; others pruned
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("global_round_*.pt"))
    assert kept == ["global_round_0000.pt", "global_round_0002.pt", f"global_round_{ROUNDS:04d}.pt"]
    c0 = torch.load(run_dir / "checkpoints" / "global_round_0000.pt")
    c3 = torch.load(run_dir / "checkpoints" / f"global_round_{ROUNDS:04d}.pt")
    for part in ("generator.", "discriminator.", "g_ema."):
        assert any(not torch.equal(c0[k], c3[k]) for k in c0 if k.startswith(part)), part
    # G_ema is an average of G, not G itself
    g = {k[len("generator.") :]: v for k, v in c3.items() if k.startswith("generator.")}
    e = {k[len("g_ema.") :]: v for k, v in c3.items() if k.startswith("g_ema.")}
    assert g.keys() == e.keys() and any(not torch.equal(g[k], e[k]) for k in g)
    # published to the coordinator's registry, checksums verified
    assert metrics["published"] == {"kind": "factory", "name": "factory-it", "version": "v0001"}
    reg = Registry(home)
    record = reg.verify("factory", "factory-it")
    assert set(record["files"]) == {"generator.pt", "factory.pt", "factory.json"}
    config = json.loads(reg.load("factory", "factory-it", "factory.json").read_text())
    assert config["clients"] == metrics["clients"] and config["factory"]["n_clients"] == 3
    # how it was trained travels with it; the matching-aware D term ran at every site
    assert config["training"]["mismatch_weight"] == 0.5 and config["training"]["diff_augment"] == {"translation": 0.1, "cutout": 0.5}
    assert config["training"]["local_discriminator"] == "projection" and config["factory"]["w_offset"] is True
    assert any(not torch.equal(c0[k], c3[k]) for k in c0 if k.startswith("g_ema.id_offset."))  # the ids' offsets were learnt and averaged
    assert all("d_mismatch" in row["train"] for r in metrics["rounds"] for row in r["sites"].values())
    gen = torch.load(reg.load("factory", "factory-it", "generator.pt"))
    assert all(torch.equal(gen[k], e[k]) for k in e)
    page = (run_dir / "report" / "index.html").read_text()
    assert "published: factory/factory-it v0001" in page and "every site reported the same key-function checksum" in page
    assert (run_dir / "report" / f"round_{ROUNDS:04d}.png").is_file()
    res = cli("coordinator", "results", run_dir.name, "--home", home)
    assert res.returncode == 0 and "published: factory/factory-it v0001" in res.stdout, res.stdout + res.stderr
    res = cli("coordinator", "registry", "--home", home)
    assert res.returncode == 0 and "factory-it" in res.stdout and "v0001" in res.stdout, res.stdout + res.stderr
