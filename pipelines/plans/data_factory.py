"""The federated data factory: a conditional StyleGAN2-style generator trained across sites."""

from pipelines.plans.factory import DataFactoryPlanBase


class DataFactoryPlan(DataFactoryPlanBase):
    """Conditional GAN "data factory" (client id, slice bin and the site's domain key).

    One update is one D or G step, alternating; lazy R1 and path-length regularisation;
    G, D and G_ema are averaged with uniform weights over the sampled sites. The domain key
    is computed at the site from all its slices and never leaves it. Implementation:
    pipelines.plans.factory and pipelines.factory.
    """
