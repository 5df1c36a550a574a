import sys

from weightwire.cli import main

sys.exit(main())
