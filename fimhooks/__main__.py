import sys

from fimhooks.cli import main

sys.exit(main())
