"""python -m trainers.memory MODEL [--seq-len N ...]: see trainers/memory/cli.py."""

import sys

from trainers.memory.cli import main

sys.exit(main())
