"""``python -m compensator`` (and ``torchrun -m compensator``): the command line."""

from compensator.cli import main

main()
