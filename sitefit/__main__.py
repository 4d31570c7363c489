import sys

from sitefit.cli import main

sys.exit(main())
