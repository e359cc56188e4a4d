# -*- test-case-name: tests.test_conventions -*-
"""
hermux: a reverse proxy in front of OpenRouter that spreads requests over
several API keys.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
