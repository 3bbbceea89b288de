"""`python -m embedkit.bench KIND JSON`: one worker configuration (see worker.py)."""

import sys

from embedkit.bench.worker import main

main(sys.argv[1:])
