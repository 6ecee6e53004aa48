"""A websocketd-style program: reads lines on stdin and prints each one reversed (flushed at once)."""

import sys

for line in sys.stdin:
    print(line.rstrip("\n")[::-1], flush=True)
