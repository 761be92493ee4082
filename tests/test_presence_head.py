"""The image-level presence head (`pipelines.presence`, issue 26): attached to each network's encoder without changing
its segmentation output or its weights' names, trained only where a site labels the class, gating inference, scored
at validation, checked at the spec boundary, kept in model packages."""

from __future__ import annotations

import copy

import pytest
import torch

from pipelines.inference import class_probabilities
from pipelines.networks import build_network, output_biases
from pipelines.plan_args import parse_plan_args
from pipelines.presence import (
    absent_classes,
    attach_presence_head,
    has_presence_head,
    presence_logits,
    presence_loss,
    presence_report,
    presence_targets,
)
from pipelines.training import build_model, predict, predict_with_presence, teacher_logits
from preprocessing.schema import load_schema

CHEST = load_schema("chest-xr")
PNEUMOTHORAX = CHEST.classes["pneumothorax"]


def settings(network: dict | None = None, **head):
    args = {"network": network or {"name": "basic_unet", "spatial_dims": 2, "features": [4, 4, 8, 8, 16, 4]}, "roi_size": [32, 32], "spacing": "native"}
    if head is not None:
        args["presence_head"] = {"classes": ["pneumothorax"], **head}
    return parse_plan_args(args, CHEST)


@pytest.mark.parametrize("name", ["mednext", "dynunet", "basic_unet", "flexible_unet"])
def test_every_network_gets_a_head_without_changing_its_segmentation(name):
    torch.manual_seed(0)
    plain = build_network(name, spatial_dims=2, out_channels=5)
    headed = copy.deepcopy(plain)
    attach_presence_head(headed, name, 2, 2, (32, 32))
    assert has_presence_head(headed) and not has_presence_head(plain)
    keys = set(headed.state_dict())
    assert set(plain.state_dict()) == {k for k in keys if not k.startswith("presence_head.")}  # MONAI's names unchanged
    assert {k for k in keys if k.startswith("presence_head.")} == {"presence_head.fc.weight", "presence_head.fc.bias"}
    x = torch.randn(3, 1, 32, 32)
    plain.eval(), headed.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), headed(x))
    logits = presence_logits(headed)
    assert logits is not None and logits.shape == (3, 2)
    assert presence_logits(headed) is None  # taken: the network keeps no tensor of its last forward
    assert presence_logits(plain) is None


def test_a_deep_copy_computes_its_own_logits():
    net = build_model(settings())
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        teacher.presence_head.fc.bias.fill_(5.0)
        net.presence_head.fc.bias.fill_(-5.0)
    x = torch.randn(2, 1, 32, 32)
    net(x)
    logits = presence_logits(net)
    assert logits is not None and bool((logits < 0).all()) and presence_logits(teacher) is None
    teacher_logits(teacher, x, 2)
    assert presence_logits(teacher) is None  # the teacher's logits are dropped after its forward
    copy.deepcopy(net)  # nothing of a training forward left on the network


def test_the_loss_trains_only_what_the_site_labels():
    labels = torch.zeros(4, 1, 8, 8, dtype=torch.long)
    labels[1, 0, 2, 2] = PNEUMOTHORAX
    labels[3, 0, 5:7, 5:7] = PNEUMOTHORAX
    assert presence_targets(labels, [PNEUMOTHORAX]).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    logits = torch.zeros(4, 1, requires_grad=True)
    loss = presence_loss(logits, labels, [PNEUMOTHORAX], labelled=[PNEUMOTHORAX])
    assert float(loss) == pytest.approx(float(torch.log(torch.tensor(2.0))))  # BCE at p = 0.5
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    other = torch.zeros(4, 1, requires_grad=True)
    blind = presence_loss(other, labels, [PNEUMOTHORAX], labelled=[CHEST.classes["heart"]])
    blind.backward()
    assert float(blind) == 0.0 and other.grad is not None and float(other.grad.abs().sum()) == 0.0  # zero, not none


def test_inference_removes_an_absent_class():
    assert absent_classes({4: 0.2, 3: 0.6}, 0.5) == [4] and absent_classes({4: 0.2}, None) == []
    # a network whose segmentation paints pneumothorax everywhere, and whose head says it is absent (or present)
    s = settings()
    net = build_model(s)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for bias in output_biases(net, s.num_classes):
            bias[PNEUMOTHORAX] = 10.0
        net.presence_head.fc.bias.fill_(-3.0)
    image = torch.randn(1, 40, 36, 1)
    pred, probabilities = predict_with_presence(net, image, s)
    assert probabilities == {PNEUMOTHORAX: pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))}
    assert int((pred == PNEUMOTHORAX).sum()) == 0 and torch.equal(predict(net, image, s), pred)
    ungated = settings(gate=False)
    assert int((predict(net, image, ungated) == PNEUMOTHORAX).sum()) == image[0].numel()
    # site-agent infer's path (probabilities, then argmax on the input grid): the same gate
    probs = class_probabilities(net, image, s)
    assert float(probs[PNEUMOTHORAX].max()) == 0.0 and torch.allclose(probs.sum(0), torch.ones(40, 36, 1))
    assert float(class_probabilities(net, image, ungated)[PNEUMOTHORAX].min()) > 0.99
    with torch.no_grad():
        net.presence_head.fc.bias.fill_(3.0)
    assert int((predict(net, image, s) == PNEUMOTHORAX).sum()) == image[0].numel()


def test_the_validation_report_has_rates_not_cases():
    def case(p: float, positive: bool) -> tuple[dict[int, float], torch.Tensor]:
        label = torch.zeros(1, 6, 6, 1, dtype=torch.long)
        if positive:
            label[0, 2, 2, 0] = PNEUMOTHORAX
        return {PNEUMOTHORAX: p}, label

    cases = [case(0.9, True), case(0.6, False), case(0.3, True), case(0.1, False)]
    names = {v: k for k, v in CHEST.classes.items()}
    report = presence_report(cases, [PNEUMOTHORAX], names, 0.5)
    assert report == {"presence_accuracy_pneumothorax": 0.5, "presence_positive_pneumothorax": 2.0, "presence_auc_pneumothorax": 0.75}
    one_kind = presence_report([case(0.9, True)], [PNEUMOTHORAX], names, None)
    assert "presence_auc_pneumothorax" not in one_kind and one_kind["presence_accuracy_pneumothorax"] == 1.0


def test_the_spec_boundary_checks_the_head():
    s = settings(weight=2.0, threshold=0.3)
    assert s.presence_classes == (PNEUMOTHORAX,) and s.presence_weight == 2.0 and s.presence_threshold == 0.3
    assert settings(gate=False).presence_threshold is None
    plain = parse_plan_args({"network": {"name": "basic_unet", "spatial_dims": 2}, "roi_size": [32, 32]}, CHEST)
    assert plain.presence_classes == () and not has_presence_head(build_model(plain))
    for bad, problem in (({"classes": ["lung"]}, "plan_args.presence_head.classes: 'lung' not foreground classes of schema chest-xr"),
                         ({"classes": []}, "plan_args.presence_head.classes: must be a non-empty list"),
                         ({"classes": ["heart"], "threshold": 2}, "plan_args.presence_head.threshold: must be in [0, 1]")):  # fmt: skip
        with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
            parse_plan_args({"network": {"name": "basic_unet", "spatial_dims": 2}, "roi_size": [32, 32], "presence_head": bad}, CHEST)
    with pytest.raises(ValueError, match="no presence head for network 'unet'"):
        attach_presence_head(torch.nn.Conv2d(1, 1, 1), "unet", 1, 2, (8, 8))


def test_a_plan_trains_the_head_on_what_the_site_labels_and_scores_it(fedbiomed_round, tmp_path_factory, tmp_path, monkeypatch, site_process, one_thread):
    """A real plan round on a synthetic site labelling kidney and kidney tumour, the head on kidney tumour (labelled) and
    liver (not): the round reports its presence loss, only the tumour's head row learns, validation scores the tumour's."""
    from coordinator.plans import model_args_for
    from fedimg_testing.synthetic import write_synthetic_dataset
    from pipelines.plans.marginal import MarginalSegmentationPlan
    from tests.test_split_data import _fedbiomed_round, _training_args

    root = tmp_path_factory.mktemp("presence-site") / "prepared"
    write_synthetic_dataset(root, seed=4, n_cases=4, shape=(32, 32, 32))  # kidney (1) and kidney_tumor (2)
    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path / "cache"))
    args = model_args_for("marginal", {"network": {"name": "basic_unet", "size": "tiny"}, "roi_size": 32, "spacing": "native", "augment": False,
                                       "presence_head": {"classes": ["kidney_tumor", "liver"]}})  # fmt: skip
    args.update(run_id="run-presence", rounds_total=2, local_steps=2, split={"validation": 0.25, "test": 0.25, "seed": 0})
    plan = MarginalSegmentationPlan()
    plan.post_init(args, _training_args(0.25), node_id="NODE_A", round=0)
    _fedbiomed_round(fedbiomed_round, plan, root, {}, test_ratio=0.25)
    head = plan.model().presence_head.fc
    before = head.weight.detach().clone()
    monitor = Monitor()
    plan.training_routine(history_monitor=monitor, node_args={"gpu": False})
    train = next(c["metric"] for c in monitor.scalars if "presence_loss" in c["metric"])
    assert train["presence_loss"] > 0
    assert not torch.equal(head.weight[0], before[0])  # kidney tumour: labelled here, learnt
    assert torch.allclose(head.weight[1], before[1], atol=1e-4)  # liver: not labelled here, only AdamW's weight decay
    scored = Monitor()
    plan.testing_routine(metric=None, metric_args={}, history_monitor=scored, before_train=True)
    (call,) = scored.scalars
    metric = call["metric"]
    # validation and test cases: every synthetic case shows a tumour
    assert metric["presence_positive_kidney_tumor"] == metric["cases"] and metric["test_presence_positive_kidney_tumor"] == metric["test_cases"]
    assert 0.0 <= metric["presence_accuracy_kidney_tumor"] <= 1.0 and "test_presence_accuracy_kidney_tumor" in metric
    assert not any(k.endswith("_liver") for k in metric)


class Monitor:
    """Fed-BioMed's history monitor as the plan uses it."""

    def __init__(self):
        self.scalars: list[dict] = []

    def add_scalar(self, **kwargs):
        self.scalars.append(kwargs)
