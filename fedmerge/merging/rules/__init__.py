"""The merging rules, one module per rule, each ending with its method's record.

Nothing is imported here: the functions of the same names (``fedmerge.merging.cclip`` and the others) live in
:mod:`fedmerge.merging`, so a module path never shadows a function or the other way round.
"""
