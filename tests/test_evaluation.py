import math

import numpy as np
import torch

from pipelines.evaluation import dice_per_class, merge_lesions, predict_volume, summarise
from preprocessing.schema import load_schema


def test_dice_per_class_empty_mask_rule_and_ignore():
    ref = np.array([0, 1, 1, 2, 2, 255, 0, 0])
    pred = np.array([0, 1, 0, 2, 2, 3, 3, 0])
    d = dice_per_class(pred, ref, classes=[1, 2, 3, 4])
    assert d[1] == 2 * 1 / (2 + 1)  # one of two found, no false positive
    assert d[2] == 1.0
    assert d[3] == 0.0  # absent from the reference but predicted (at a valid voxel): an error
    assert math.isnan(d[4])  # absent from both: not scored
    # the prediction at the ignored voxel does not count
    assert math.isnan(dice_per_class(np.array([0, 3]), np.array([0, 255]), classes=[3])[3])


def test_merge_lesions_uses_the_schema_groups():
    schema = load_schema()
    table = schema.lesion_merge_table()
    lab = np.array([0, 1, 2, 3, 4, 5, 6, 7, 255])
    assert merge_lesions(lab, table).tolist() == [0, 1, 1, 3, 3, 5, 5, 7, 255]


def test_summarise_excludes_nan_cases():
    s = summarise([{1: 1.0, 2: float("nan")}, {1: 0.5, 2: 0.25}], classes=[1, 2, 3])
    assert s["1"] == 0.75 and s["2"] == 0.25 and math.isnan(s["3"]) and s["mean"] == 0.5


def test_predict_volume_sliding_window_matches_a_whole_volume_forward():
    torch.manual_seed(0)
    model = torch.nn.Conv3d(1, 3, kernel_size=1)  # pointwise: windows cannot change the answer
    image = torch.randn(1, 20, 18, 11)
    pred = predict_volume(model, image, roi_size=(8, 8, 8), overlap=0.5)
    assert pred.shape == (20, 18, 11)
    with torch.no_grad():
        ref = torch.argmax(model(image.unsqueeze(0)), dim=1)[0]
    assert torch.equal(pred, ref)
    assert model.training  # mode restored


def test_predict_volume_picks_the_main_head():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return [y, -y]

    pred = predict_volume(TwoHeads(), torch.randn(1, 12, 12), roi_size=(8, 8), head=lambda out: out[0])
    assert pred.shape == (12, 12)


class _FixedLogits(torch.nn.Module):
    """Per-voxel logits from the image's channels (C == classes): the test decides who wins."""

    def forward(self, x):
        return x


def test_predict_volume_folds_untrained_classes_into_background():
    # 4 classes; voxel A: untrained class 2 wins outright; voxel B: class 2 wins, but folding
    # it into background makes background win; voxel C: class 1 wins either way
    logits = torch.full((4, 3, 1, 1), -5.0)
    logits[:, 0, 0, 0] = torch.tensor([0.0, -1.0, 3.0, -5.0])  # A: p2 dominant -> background after folding
    logits[:, 1, 0, 0] = torch.tensor([1.0, 1.5, 1.6, -5.0])  # B: argmax 2; bg+2 beats 1
    logits[:, 2, 0, 0] = torch.tensor([-5.0, 4.0, 0.0, -5.0])  # C: class 1
    image = logits  # the model returns its input
    plain = predict_volume(_FixedLogits(), image, roi_size=(3, 1, 1))
    assert plain.flatten().tolist() == [2, 2, 1]
    folded = predict_volume(_FixedLogits(), image, roi_size=(3, 1, 1), allowed=[1, 3])
    assert folded.flatten().tolist() == [0, 0, 1]
    assert predict_volume(_FixedLogits(), image, roi_size=(3, 1, 1), allowed=[1, 2, 3]).flatten().tolist() == [2, 2, 1]
