"""The spine's first plan: a small MONAI segmentation network trained with FedAvg.

Model arguments (from the experiment spec's `plan_args`):
  num_classes: int, including background
  network: dict for `pipelines.networks.build_network` (name, features, spatial_dims)
  roi_size: patch size sampled from each case (default 32 per axis)
"""

from fedbiomed.common.training_plans import TorchTrainingPlan


class FedAvgSegmentationPlan(TorchTrainingPlan):
    """Supervised segmentation (Dice + CE) on a site's prepared dataset."""

    def init_dependencies(self):
        return [
            "import torch",
            "from monai.losses import DiceCELoss",
            "from fedbiomed.common.datamanager import DataManager",
            "from pipelines.networks import build_network",
            "from pipelines.segmentation import dice_per_class, random_flip_batch",
            "from pipelines.plans.datasets import PreparedSegmentationDataset",
        ]

    def init_model(self, model_args):
        network = dict(model_args.get("network") or {})
        return build_network(out_channels=int(model_args["num_classes"]), **network)

    def init_optimizer(self, optimizer_args):
        return torch.optim.Adam(self.model().parameters(), lr=optimizer_args.get("lr", 1e-3))

    def training_data(self):
        dataset = PreparedSegmentationDataset()
        dataset.roi_size = list(self.model_args().get("roi_size") or [32, 32, 32])
        return DataManager(dataset=dataset, shuffle=True)

    def _loss(self):
        if not hasattr(self, "_loss_fn"):
            self._loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        return self._loss_fn

    def training_step(self, data, target):
        image, label = random_flip_batch(data, target)
        return self._loss()(self.model()(image), label)

    def testing_step(self, data, target):
        logits = self.model()(data)
        dice = dice_per_class(logits, target, int(self.model_args()["num_classes"]))
        metrics = {"loss": float(self._loss()(logits, target))}
        metrics.update({f"dice_{c + 1}": float(v) for c, v in enumerate(dice)})
        metrics["dice_mean"] = float(torch.nanmean(dice))
        return metrics
