"""Reference harness for comparing gate functions in policy-gradient RL for LLMs."""

__version__ = "0.1.0"
