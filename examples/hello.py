"""Hello from a warm (or cold) run: the interpreter version and this process's pid."""

import os
import sys

print(f"hello from python {sys.version.split()[0]} (pid {os.getpid()})")
