"""`python -m slimkit ...` (and `torchrun --nproc-per-node N -m slimkit ...`): the slimkit CLI."""
import sys

from slimkit.cli.main import main

sys.exit(main())
