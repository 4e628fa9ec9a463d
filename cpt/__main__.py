"""`python -m cpt …` works like `cpt …` (and so does `torchrun -m cpt train …`)."""

import sys

from cpt.cli import main

sys.exit(main())
