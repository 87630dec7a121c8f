"""Label sets of the supported datasets, in each dataset's own class order.

Class names are canonical across sets (``angry`` not ``anger``, ``happy`` not ``happiness``) so that
anchors, colours and cross-dataset evaluation can key on the name.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

LABEL_SETS: dict[str, tuple[str, ...]] = {
    # FER2013 (Kaggle csv order): 0 angry ... 6 neutral.
    "fer7": ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"),
    # FER+ (fer2013new.csv vote-column order), 8 classes.
    "ferplus8": ("neutral", "happy", "surprise", "sad", "angry", "disgust", "fear", "contempt"),
    # AffectNet expression ids 0..7.
    "affectnet8": ("neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt"),
    # RAF-DB basic emotion ids 1..7 (stored 0-based).
    "rafdb7": ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral"),
}

ALIASES = {
    "anger": "angry",
    "happiness": "happy",
    "sadness": "sad",
    "surprised": "surprise",
    "fearful": "fear",
    "disgusted": "disgust",
}


def canonical(name: str) -> str:
    """Canonical lower-case class name (``Happiness`` -> ``happy``)."""
    key = name.strip().lower()
    return ALIASES.get(key, key)


# The per-face fields of the result rows (``ferengine.results``: CSV columns and JSON keys). A class name equal to
# one of them would overwrite the row's own field, so checkpoints may not use them (defined here, where the
# checkpoint contract and the result writer can both import them without an import cycle).
RESULT_LEADING_FIELDS = ("frame", "time_s", "face_id", "x", "y", "w", "h", "score", "label")
RESULT_TRAILING_FIELDS = ("valence", "arousal", "av_source")
RESULT_JSON_FIELDS = ("confidence", "keypoints")
RESERVED_CLASS_NAMES = frozenset(RESULT_LEADING_FIELDS + RESULT_TRAILING_FIELDS + RESULT_JSON_FIELDS)

MAX_CLASS_NAME_CHARS = 100


def check_class_names(labels: Sequence[str]) -> list[str]:
    """The class names of a model, checked: each a non-empty string (surrounding spaces are dropped) of at most
    :data:`MAX_CLASS_NAME_CHARS` printable characters, no two the same after :func:`canonical` (``Happy`` and
    ``happy ``, or ``anger`` and ``angry``, are one class to anchors, colours and evaluation), none equal to a
    result field (:data:`RESERVED_CLASS_NAMES`, compared case-insensitively). Returns the names stripped;
    raises ``ValueError`` with one sentence naming the first offending name and what to do."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for i, name in enumerate(labels):
        if not isinstance(name, str):
            raise ValueError(f"class name {i} must be a string, got {name!r} ({type(name).__name__})")
        text = name.strip()
        if not text:
            raise ValueError(f"class name {i} is empty; give every class a name")
        if len(text) > MAX_CLASS_NAME_CHARS:
            raise ValueError(f"class name {i} has {len(text)} characters (at most {MAX_CLASS_NAME_CHARS})")
        if not text.isprintable():
            raise ValueError(f"class name {i} {text!r} holds control characters (line breaks, tabs ...)")
        key = canonical(text)
        if key in RESERVED_CLASS_NAMES:
            raise ValueError(f"class name {text!r} is also a field of every result row ({', '.join(sorted(RESERVED_CLASS_NAMES))}) "
                             f"and would overwrite it; rename the class")
        if key in seen:
            raise ValueError(f"class names {seen[key]!r} and {text!r} name the same class ({key!r}); every class "
                             f"needs its own name")
        seen[key] = text
        out.append(text)
    return out


def label_set(name: str) -> tuple[str, ...]:
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise KeyError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}") from None


# ------------------------------------------------------------------------ valence/arousal anchors
#
# Where a categorical class sits in the valence/arousal plane, used to *estimate* valence/arousal for
# models that have no AV head (the app labels such values "estimated").
#
# Source: J. A. Russell and A. Mehrabian (1977), "Evidence for a three-factor theory of emotions",
# Journal of Research in Personality 11(3):273-294, doi:10.1016/0092-6566(77)90037-X. The paper rates
# 151 emotion terms on pleasure (P), arousal (A) and dominance (D), each scaled to [-1, 1]; we take
# P as valence and A as arousal (D is dropped) for the term closest to each class:
#
#   class     term        P      A      (D, unused)
#   angry     angry     -0.51  +0.59   (+0.25)
#   disgust   disgusted -0.60  +0.35   (+0.11)
#   fear      afraid    -0.64  +0.60   (-0.43)
#   happy     happy     +0.81  +0.51   (+0.46)
#   sad       sad       -0.63  -0.27   (-0.33)
#   surprise  surprised +0.40  +0.67   (-0.13)
#
# neutral is the origin of the plane by definition (no published rating needed).
#
# contempt has no rating we could verify in that table. Its anchor is OUR placement, not a published
# measurement: valence between the ``angry`` and ``disgust`` ratings above (contempt is a rejecting,
# unpleasant state close to both) and a low positive arousal, because contempt is characterised as
# a "cold", low-activation sentiment (M. M. Gervais and D. M. T. Fessler (2017), "On the deep
# structure of social affect: attitudes, emotions, sentiments, and the case of 'contempt'",
# Behavioral and Brain Sciences 40:e225). Replace it when a measured value is available.
AV_ANCHORS: dict[str, tuple[float, float]] = {
    "angry": (-0.51, 0.59),
    "disgust": (-0.60, 0.35),
    "fear": (-0.64, 0.60),
    "happy": (0.81, 0.51),
    "sad": (-0.63, -0.27),
    "surprise": (0.40, 0.67),
    "neutral": (0.0, 0.0),
    "contempt": (-0.55, 0.20),  # our placement, see above
}

AV_ANCHOR_SOURCE = (
    "Russell & Mehrabian (1977), J. Research in Personality 11:273-294 (pleasure, arousal of the "
    "terms angry, disgusted, afraid, happy, sad, surprised); neutral = origin; contempt placed by "
    "fer-desktop (no published rating)"
)


def anchor_matrix(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(K, 2)`` float64 anchors for ``labels`` (rows of classes without an anchor are zero) and a
    ``(K,)`` bool mask saying which classes have one."""
    anchors = np.zeros((len(labels), 2), dtype=np.float64)
    mask = np.zeros(len(labels), dtype=bool)
    for i, name in enumerate(labels):
        a = AV_ANCHORS.get(canonical(name))
        if a is not None:
            anchors[i] = a
            mask[i] = True
    return anchors, mask


def estimate_va(probs: Sequence[float] | np.ndarray, labels: Sequence[str]) -> tuple[float, float]:
    """Valence and arousal as the probability-weighted mean of the classes' :data:`AV_ANCHORS`.

    ``probs`` are one face's class probabilities in the order of ``labels``. Classes without an anchor
    are left out and the remaining weights renormalised; with no anchored probability mass at all the
    result is the neutral point ``(0.0, 0.0)``. The result lies in [-1, 1] (a convex combination of
    anchors in [-1, 1]).
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if p.shape[0] != len(labels):
        raise ValueError(f"{p.shape[0]} probabilities for {len(labels)} labels")
    anchors, mask = anchor_matrix(labels)
    w = np.where(mask, np.clip(p, 0.0, None), 0.0)
    total = w.sum()
    if not np.isfinite(total) or total <= 0.0:
        return 0.0, 0.0
    v, a = (w @ anchors) / total
    return float(v), float(a)
