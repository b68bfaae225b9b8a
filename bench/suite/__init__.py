"""``bench/run``: every figure of issue 15's budget table, next to its peer's, in one run.

``main`` runs the providers (``providers.py``), each a function or a script that returns
figures as a dict; ``figures.py`` holds the budget table and how each budget is judged.
"""
