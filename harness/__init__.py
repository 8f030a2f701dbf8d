"""Reference harness for comparing gate functions in policy-gradient RL for LLMs."""

import os
import sys

__version__ = "0.1.0"

# Idle OpenMP threads sleep instead of spinning. torch's OpenMP runtime reads this once, when torch loads, so it is set
# on the package's import, before any module here imports torch; an explicit value in the environment wins. With
# spinning threads a process sharing its cores with other work ran many times slower
# (`python benchmarks/bench_threads.py` measures it; docs/real-models.md, "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Whether torch's idle OpenMP threads sleep in this process: not if torch was loaded before this package (then its
# threads spin, whatever the environment says now).
OMP_THREADS_SLEEP = "torch" not in sys.modules and os.environ["OMP_WAIT_POLICY"].strip().upper() == "PASSIVE"
