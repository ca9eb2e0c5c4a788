"""Runnable examples: ``python -m cpattn.examples.<name>``."""
