"""Old ``_target_`` paths, translated (torch-free: the job-dir checks before Hydra use it)."""

from __future__ import annotations

from typing import Any

#: ``_target_`` paths of the flat layout of version 0.1 (before the subpackages), and where
#: they live now: job dirs and configs written before the move keep working.
LEGACY_TARGETS = {
    "pfc_sweeps.models.torchvision_resnet": "pfc_sweeps.nets.resnets.torchvision_resnet",
}


def current_target(target: Any) -> Any:
    """``target`` with a 0.1 path (:data:`LEGACY_TARGETS`) replaced by today's."""
    return LEGACY_TARGETS.get(target, target) if isinstance(target, str) else target
