"""Personalization methods behind one contract (methods/common/base.py): one module per method,
named as the method (``method=<name>``: ``methods/<name>.py``, ``conf/method/<name>.yaml``);
what they share lives in ``methods.common``."""
