"""`python -m alignflow ...` (what `torchrun ... -m alignflow STAGE CONFIG` runs in every process)."""

from alignflow.cli.main import main

main()
