"""``python -m logitcache`` (what ``torchrun -m logitcache`` runs)."""

from logitcache.cli import main

main()
