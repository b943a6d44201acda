import sys

from bench.decode_bench import main

sys.exit(main())
