#!/usr/bin/env python3
"""Stand-in for a model server that crashes the way a mis-built binary does.

It prints a line and sends itself the signal named in STAND_IN_SIGNAL (default
SIGSEGV), with core dumps disabled so no core file is written.
"""

import os
import resource
import signal

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
print("stand-in: loading the model", flush=True)
os.kill(os.getpid(), signal.Signals[os.environ.get("STAND_IN_SIGNAL", "SIGSEGV")])
