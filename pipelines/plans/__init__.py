"""Fed-BioMed training plans: thin classes over the `pipelines` library.

This sub-package is the only part of `pipelines` that imports Fed-BioMed. A plan's source
(and only its source) is shipped to the sites and must be approved there; everything it
imports must be installed on the site image too.
"""
