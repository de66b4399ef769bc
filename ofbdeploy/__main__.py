"""``python -m ofbdeploy`` (and ``torchrun -m ofbdeploy``) run the command line."""

from ofbdeploy.cli import main

main()
