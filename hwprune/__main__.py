"""``hwprune`` and ``python -m hwprune``: the command line, in a process whose pages time reproducibly."""

from __future__ import annotations


def main() -> None:
    from hwprune.latency.pages import reexec_for_timing

    reexec_for_timing()  # before any work: glibc reads its huge-page tunable only at start
    from hwprune.cli import app

    app()


if __name__ == "__main__":
    main()
