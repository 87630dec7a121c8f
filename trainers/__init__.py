"""Training code of fer-desktop: the method zoo on one engine.

    python -m trainers --list                  # every method, its paper and datasets
    python -m trainers.<method> --data NAME    # train one (e.g. trainers.daf, trainers.baseline)

Methods live in ``trainers/methods/<name>.py``; the finder below makes ``trainers.<name>`` that module, so
``python -m trainers.<name>`` runs it and ``import trainers.<name>`` returns it, with no second file per
method. Real modules of this package (``trainers.engine``, ``trainers.calibrate``, ...) always win.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_METHODS_DIR = Path(__file__).resolve().with_name("methods")


class _MethodModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``trainers.<name>`` -> ``trainers.methods.<name>`` for every ``trainers/methods/<name>.py``."""

    @staticmethod
    def _method(fullname: str) -> str | None:
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or not name.isidentifier() or name.startswith("_"):
            return None
        return name if (_METHODS_DIR / f"{name}.py").is_file() else None

    def find_spec(self, fullname, path=None, target=None):
        name = self._method(fullname)
        if name is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(_METHODS_DIR / f"{name}.py"))

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:  # `import trainers.daf`: the method module itself
        real = importlib.import_module(f"{__name__}.methods.{module.__name__.rpartition('.')[2]}")
        sys.modules[module.__name__] = real

    def get_code(self, fullname):  # `python -m trainers.daf`: run the method's command line
        name = self._method(fullname)
        return compile(f"from trainers.methods import run\nraise SystemExit(run({name!r}))",
                       f"<python -m {fullname}>", "exec")

    def is_package(self, fullname) -> bool:
        return False


if not any(isinstance(f, _MethodModules) for f in sys.meta_path):
    sys.meta_path.append(_MethodModules())
