"""ConDistFL: marginal loss + lambda * conditional distillation from the received global model."""

from pipelines.plans.segmentation import PartialLabelSegmentationPlan


class ConDistFLPlan(PartialLabelSegmentationPlan):
    """ConDistFL (conditional distillation for partially labelled federations).

    The teacher is the global model exactly as received this round: frozen, eval mode, no
    gradient, run on the same augmented batch. Loss: marginal Dice+CE on the site's labelled
    classes + lambda * ConDist Dice (lambda 0.01 -> 1.0 over the rounds, temperature from the
    spec). Implementation: pipelines.plans.segmentation and pipelines.training.
    """

    distill = True
