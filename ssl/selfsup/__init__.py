"""selfsup: self-supervised visual representation learning with DVC stages, Ray Train and MLflow.

The library knows nothing of DVC or params.yaml: pipeline stages (pipelines/) validate params into
the typed objects of `selfsup.config` and call in here.
"""

__version__ = "0.1.0"
