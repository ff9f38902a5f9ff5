"""``python -m blossomrec_cuda.rec`` is ``python -m blossomrec_cuda.rec.train``."""
import sys

from .train import main

sys.exit(main())
