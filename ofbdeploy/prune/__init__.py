"""Pruning methods as registered plug-ins: each decides an architecture to a budget from a dense model.

``registry.METHODS`` maps a recipe's ``search.method`` to the method's own config class and its ``decide()``;
the budget arithmetic every method shares (enforcing and filling a budget) is in ``budget.py``, and what a
method hands back to the run is a ``result.SearchResult``.
"""
