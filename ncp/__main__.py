import sys

from ncp.cli import main

sys.exit(main())
