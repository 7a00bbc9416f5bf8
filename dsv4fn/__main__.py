"""`python -m dsv4fn demo`: the tiny-config demo (see dsv4fn/demo.py)."""

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "demo":
        print("usage: python -m dsv4fn demo [--backend NAME] [--seed N] [--decode-steps N] [--chunk N]")
        return 2
    from .demo import main as demo_main

    return demo_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
