"""Runtimes as plug-ins: one module per runtime, named in ``registry``."""
