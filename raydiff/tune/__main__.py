import sys

from raydiff.tune.sweep import main

sys.exit(main())
