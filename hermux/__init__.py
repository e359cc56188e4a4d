"""
hermux: a reverse proxy in front of OpenRouter that spreads requests over
several API keys.
"""

__version__ = "0.1.0"
