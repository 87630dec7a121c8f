"""Loss functions of the methods, one module per loss family (see DESIGN.md): ``tc`` (DAF-CNN's
triplet-centre loss), ... Each is unit-tested against hand-computed values on a tiny input."""
from __future__ import annotations

from .tc import TCResult, TripletCentreLoss, centre_delta, feature_gradient, triplet_centre_loss

__all__ = ["TCResult", "TripletCentreLoss", "centre_delta", "feature_gradient", "triplet_centre_loss"]
