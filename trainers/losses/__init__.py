"""Loss functions of the methods, one module per loss family: ``ce`` (cross-entropy with masks and soft
targets, valence/arousal MSE), ``tc`` (DAF-CNN's triplet-centre loss), ... Each is unit-tested against
hand-computed values on a tiny input."""
from __future__ import annotations

from .ce import classification_loss, masked_cross_entropy, va_loss
from .tc import TCResult, TripletCentreLoss, centre_delta, feature_gradient, triplet_centre_loss

__all__ = ["TCResult", "TripletCentreLoss", "centre_delta", "classification_loss", "feature_gradient",
           "masked_cross_entropy", "triplet_centre_loss", "va_loss"]
