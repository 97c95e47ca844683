import sys

from fimhooks.show.cli import main

sys.exit(main())
