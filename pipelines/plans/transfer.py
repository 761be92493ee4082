"""What a site's node sends and accepts as a model: the experiment's wire form (`pipelines.wire`).

The coordinator fills ``model_args["transfer"] = {"precision": fp32 | bf16 | fp16}`` in; with
it, the node sends its update as one checked buffer in that precision and checks the digest
of every model it receives before loading it (a mismatch fails the round at this site, which
the coordinator then leaves out). Without the key (an older coordinator) the node sends and
loads plain Fed-BioMed tensors, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipelines.site_errors import in_researcher_process, site_logger
from pipelines.wire import encode_or_exact, is_encoded, merge_received, transfer_precision

__all__ = ["WireTransfer"]


class WireTransfer:
    """Mixin placed before ``TorchTrainingPlan``: updates leave the node in the wire form, received models are checked.

    Only the node encodes its update: the coordinator calls ``after_training_params`` too, for
    the global model it aggregates against, which stays float32 and plain.
    """

    def after_training_params(self, flatten: bool = False) -> Any:
        """The update to send: Fed-BioMed's, in the wire form at a node (not for secure aggregation's flat vector).

        Args:
            flatten: Fed-BioMed's flag for secure aggregation (a flat list, sent as it is).

        Returns:
            The parameters to send.
        """
        params = super().after_training_params(flatten=flatten)  # type: ignore[misc]  # the next class is Fed-BioMed's plan
        precision = transfer_precision(self.model_args())  # type: ignore[attr-defined]  # Fed-BioMed's plan provides it
        if flatten or precision is None or in_researcher_process() or not isinstance(params, Mapping):
            return params
        return encode_or_exact(params, precision, site_logger().warning, "update")

    def set_model_params(self, params: dict[str, Any], local_params: list[str] | None = None) -> None:
        """Load weights; a received wire-form model is checked against its digest and decoded first.

        Args:
            params: name -> tensor, possibly with the wire entry.
            local_params: Fed-BioMed's local parameter names.

        Raises:
            WireChecksumError: the received model changed on its way (the round fails at this site).
        """
        if isinstance(params, Mapping) and is_encoded(params):
            params = merge_received(params)
        super().set_model_params(params, local_params=local_params)  # type: ignore[misc]  # the next class is Fed-BioMed's plan
