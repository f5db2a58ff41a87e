"""``python -m mmretrieve.cli`` = the ``mmretrieve`` command."""

import sys

from mmretrieve.cli import main

sys.exit(main())
