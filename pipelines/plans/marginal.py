"""The partial-label baselines: marginal Dice+CE only (FedAvg, FedProx, FedOpt, standalone)."""

from pipelines.plans.segmentation import PartialLabelSegmentationPlan


class MarginalSegmentationPlan(PartialLabelSegmentationPlan):
    """Marginal Dice+CE on the classes the site labels; every other class is merged into
    background. FedAvg / FedProx / FedOpt / standalone differ only on the server side (or
    in `fedprox_mu`), not here. Implementation: pipelines.plans.segmentation."""

    distill = False
