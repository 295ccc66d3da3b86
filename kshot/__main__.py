"""`python -m kshot ...` runs the command line (e.g. under torchrun: `torchrun --nproc-per-node 2 -m kshot train R`)."""

from kshot.cli import main

main()
