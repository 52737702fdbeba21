"""The error of ``unimodal_logits()`` on a balancer without a classifier of one modality alone.

``unimodal_logits()`` means, for every method, the logits of a classifier that sees one
modality alone: the trained heads of MLB and Multi-Loss, or detached linear probes (``probes=``
of Joint, AGM, PMR, and of OGM and MSLR with a ``fusion_head``). A method built without one gets
this error, which names the fix.
"""

from __future__ import annotations

import inspect
from typing import Any

from gradbalance.errors import UnavailableError


def no_unimodal_classifier(balancer: Any) -> UnavailableError:
    """The :class:`~gradbalance.errors.UnavailableError` that names how to get one."""
    name = type(balancer).__name__
    accepts_probes = any(
        "probes" in inspect.signature(vars(cls)["__init__"]).parameters
        for cls in type(balancer).__mro__
        if "__init__" in vars(cls)
    )
    if accepts_probes:
        fix = (
            f"build it with probes=True (gb.{name}(..., probes=True): detached linear probes, "
            "which never send a gradient into the encoders)"
        )
    else:
        fix = "build it with head_mode='probe' (detached linear probes)"
    message = (
        f"{name} has no classifier of one modality alone, so unimodal_logits() has nothing to "
        f"return: {fix}"
    )
    if getattr(balancer, "fusion_head", None) is not None:
        message += (
            f"; bal.modality_slices() gives the fused head's per-modality slices that {name} "
            "scores (not a per-modality accuracy: a slice of a jointly trained head is not a "
            "classifier of that modality alone)"
        )
    return UnavailableError(message)
