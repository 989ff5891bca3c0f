import sys

from raydiff.train.driver import main

sys.exit(main())
