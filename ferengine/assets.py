"""Where the shipped assets (face detector models, default checkpoints) live."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ENV_VAR = "FER_DESKTOP_ASSETS"


def assets_dir() -> Path:
    """Return the assets folder.

    Looked up in order: ``$FER_DESKTOP_ASSETS``; ``assets/`` beside the source tree (a clone or an
    editable install); ``<prefix>/share/fer-desktop/assets`` (a wheel install).
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent / "assets"
    if here.is_dir():
        return here
    installed = Path(sys.prefix) / "share" / "fer-desktop" / "assets"
    if installed.is_dir():
        return installed
    raise FileNotFoundError(
        f"fer-desktop assets folder not found (looked in {here} and {installed}); "
        f"set {ENV_VAR} to the assets/ folder of a fer-desktop clone"
    )


def asset_path(*parts: str) -> Path:
    return assets_dir().joinpath(*parts)
