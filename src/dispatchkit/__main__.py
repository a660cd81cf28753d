from __future__ import annotations

import sys

from dispatchkit._cli import main

sys.exit(main())
