"""Where a Fed-BioMed training plan trains: one rule for every plan (`pipelines.device.plan_device`).

Fed-BioMed 6.4.1 places training from the node's ``gpu``/``gpu_only`` arguments and the
researcher's ``use_gpu``; that rule cannot forbid a GPU a node forces, and it leaves a torch
optimizer's restored state on the CPU while the model moves to the GPU (Adam then fails on
its first step). `DevicePlacement` replaces it: the site's device setting (``FEDIMG_DEVICE``,
set by `site-agent` for its node) within the experiment's ``device.gpu``, and the optimizer
state moved with the model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from fedimg_core.devices import DEVICE_ENV
from pipelines.device import move_optimizer_state, plan_device

__all__ = ["DevicePlacement"]

log = logging.getLogger(__name__)


class DevicePlacement:
    """Mixin placed before ``TorchTrainingPlan``: ``_set_device`` from the site's setting and the spec's ``device.gpu``.

    The plan provides ``self._settings.gpu`` and, through `_torch_optimizers`, the torch
    optimizers whose state must follow the model (a declearn optimizer moves itself).
    """

    _settings: Any
    _optimizer: Any
    _model: Any
    _device: str

    def _torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The plan's torch optimizers (their state moves to the training device).

        Returns:
            Empty by default.
        """
        return []

    def _training_device(self) -> torch.device:
        """Where this site trains and scores in this experiment.

        Returns:
            The device.

        Raises:
            DeviceError: the experiment requires a GPU this site lacks, or the site forces one torch does not see.
        """
        return plan_device(os.environ.get(DEVICE_ENV, "cpu"), getattr(self._settings, "gpu", "optional"))

    def _set_device(self, use_gpu: Any, node_args: dict[str, Any]) -> None:
        """Fed-BioMed calls this before its training loop; the model moves to ``self._device`` right after.

        Args:
            use_gpu: the researcher's ``use_gpu`` (informative: ``device.gpu`` decides).
            node_args: the node's arguments (informative: the site's device setting decides).

        Raises:
            DeviceError: the experiment requires a GPU this site lacks, or the site forces one torch does not see.
        """
        device = self._training_device()
        self._device = str(device)
        for optimizer in self._torch_optimizers():
            move_optimizer_state(optimizer, device)
        init_params = getattr(getattr(self, "_model", None), "init_params", None)
        if init_params:  # Fed-BioMed's snapshot of the round's start, which its FedProx term subtracts from the moved model
            self._model.init_params = {k: v.to(device) for k, v in init_params.items()}
        if device.type == "cuda":
            # fixed patch shapes: cuDNN picks its fastest kernels once per shape (nnU-Net does the same)
            torch.backends.cudnn.benchmark = True
            self._optimizer.send_to_device(True, device.index)  # declearn optimizers keep their own state
        else:
            self._optimizer.send_to_device(False)
        log.info("training on %s (site device %s, experiment gpu %s)", device, os.environ.get(DEVICE_ENV, "cpu"), getattr(self._settings, "gpu", "optional"))
