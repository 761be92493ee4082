"""FedSR science: personalised federated one-shot segmentation by joint registration and segmentation.

`pipelines.fedsr.networks` holds the shared encoder, the registration and segmentation decoders,
the SCIE block and the warping of images and labels; `pipelines.fedsr.objectives` holds the
losses, the mutual-information estimator and the site-aggregated (SA) representation arithmetic.
The method and its open choices: shared/notes/fedsr-method.md. No federation code lives here.
"""
