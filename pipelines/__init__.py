"""The science library: segmentation training (losses, networks, transforms, augmentation, evaluation),
the data factory and domain adaptation, with their plan-argument models. Only `pipelines.plans` imports
Fed-BioMed; the plain-argument modules (``*_args``, `network_config`) import neither torch nor MONAI."""
