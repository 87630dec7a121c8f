"""Label sets of the supported datasets, in each dataset's own class order.

Class names are canonical across sets (``angry`` not ``anger``, ``happy`` not ``happiness``) so that
anchors, colours and cross-dataset evaluation can key on the name.
"""
from __future__ import annotations

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


def label_set(name: str) -> tuple[str, ...]:
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise KeyError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}") from None
