"""``python -m dcmkd`` (and ``torchrun -m dcmkd``): the ``dcmkd`` command."""
import sys

from dcmkd.cli import main

sys.exit(main())
