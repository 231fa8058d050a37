"""`python -m trainers.prepared list|prune`: what prepared datasets a storage path holds, and
pruning the least recently used (trainers/prepared/prune.py)."""

import sys

from trainers.prepared.prune import main

sys.exit(main())
