#!/usr/bin/env python3
"""Stand-in for a model server that fails at start-up.

It prints 30 numbered log lines and exits with the code in STAND_IN_EXIT_CODE
(default 3) without opening a port.
"""

import os
import sys

for number in range(1, 31):
    print(f"log line {number}", flush=True)
print("error: stand-in failed to load the model", file=sys.stderr, flush=True)
sys.exit(int(os.environ.get("STAND_IN_EXIT_CODE", "3")))
