import sys

from raydiff import console

console.configure(verbose="--verbose" in sys.argv[1:])  # before Ray is imported

from raydiff.tune.sweep import main

sys.exit(main())
