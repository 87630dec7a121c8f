"""``python -m trainers --list``: every registered method with its paper and datasets."""
from __future__ import annotations

import argparse
import sys
import textwrap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainers", description="fer-desktop's method zoo")
    p.add_argument("--list", action="store_true", help="list the registered methods")
    p.add_argument("-v", "--verbose", action="store_true", help="the traceback of an internal error")
    args = p.parse_args(argv)
    from trainers.methods import get_method, list_methods

    if not args.list:
        p.print_help()
        print("\nmethods: " + ", ".join(list_methods()) + "\nrun one: python -m trainers.<method> --help")
        return 0
    for name in list_methods():
        cls = get_method(name)
        datasets = ", ".join(cls.datasets or tuple(cls.table)) or "any"
        print(f"{name}: {cls.summary()}")
        if cls.paper:
            print(textwrap.fill(cls.paper, 100, initial_indent="  paper:    ", subsequent_indent=" " * 12))
        print(f"  datasets: {datasets}")
        print(f"  run:      python -m trainers.{name} --data {(cls.datasets or tuple(cls.table) or ('fer2013',))[0]}")
    return 0


def _guarded(argv: list[str] | None = None) -> int:
    """:func:`main` behind the trainers' one error boundary (a closed pipe, ``--list | head``, is no error)."""
    from trainers.engine.boundary import guard, wants_traceback

    args = sys.argv[1:] if argv is None else argv
    return guard("python -m trainers", lambda: main(argv), verbose=wants_traceback(args), verbose_hint="-v")


if __name__ == "__main__":
    sys.exit(_guarded())
