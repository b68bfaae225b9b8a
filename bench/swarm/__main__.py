import sys

from bench.swarm.cli import main

sys.exit(main())
