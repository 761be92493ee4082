"""FedSR: personalised federated one-shot segmentation by joint registration and segmentation."""

from pipelines.plans.fedsr_base import FedSRPlanBase


class FedSRPlan(FedSRPlanBase):
    """FedSR (shared encoder, personal registration and segmentation decoders, SA representation).

    The encoder and the SA representation are averaged by dataset size; both decoders and the
    MI critics stay at the site (tagged local). The atlas is the registry's, checked by sha256.
    ``plan_args.method`` also runs the baselines (FedRep, FedAvg) and the ablations (no MI,
    no SCIE). Implementation: pipelines.plans.fedsr_base and pipelines.fedsr.
    """
