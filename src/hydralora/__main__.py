"""`python -m hydralora` (also what torchrun runs): the command line."""

import sys

from .cli import main

sys.exit(main())
