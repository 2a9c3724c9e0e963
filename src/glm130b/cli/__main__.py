"""`python -m glm130b.cli ...` (what torchrun launches) runs the `glm130b` command."""

import sys

from glm130b.cli.commands import main

sys.exit(main())
