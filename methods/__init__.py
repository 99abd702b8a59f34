"""Personalization methods behind one contract (methods/base.py)."""
