"""Every merging method by name, each its rule's one record (:class:`~fedmerge.merging.method.Method`).

Adding a method: its rule's file in :mod:`fedmerge.merging.rules` with its record, and one entry here.
"""

import difflib

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Method
from fedmerge.merging.rules.breadcrumbs import METHOD as BREADCRUMBS, TIES as BREADCRUMBS_TIES
from fedmerge.merging.rules.bulyan import METHOD as BULYAN
from fedmerge.merging.rules.cclip import METHOD as CCLIP
from fedmerge.merging.rules.dare import LINEAR as DARE_LINEAR, TIES as DARE_TIES
from fedmerge.merging.rules.della import METHOD as DELLA
from fedmerge.merging.rules.fedavg import METHOD as FEDAVG
from fedmerge.merging.rules.fedexp import METHOD as FEDEXP
from fedmerge.merging.rules.fedgma import METHOD as FEDGMA
from fedmerge.merging.rules.fednova import METHOD as FEDNOVA
from fedmerge.merging.rules.fisher import METHOD as FISHER
from fedmerge.merging.rules.isotropic import ISO_C, ISO_CTS
from fedmerge.merging.rules.karcher import METHOD as KARCHER
from fedmerge.merging.rules.krum import KRUM, MULTI as MULTI_KRUM
from fedmerge.merging.rules.mean_direction import METHOD as MEAN_DIRECTION
from fedmerge.merging.rules.median import METHOD as MEDIAN
from fedmerge.merging.rules.model_stock import METHOD as MODEL_STOCK
from fedmerge.merging.rules.regmean import METHOD as REGMEAN
from fedmerge.merging.rules.scaffold import METHOD as SCAFFOLD
from fedmerge.merging.rules.slerp import METHOD as SLERP
from fedmerge.merging.rules.ties import METHOD as TIES
from fedmerge.merging.rules.trimmed_mean import METHOD as TRIMMED_MEAN
from fedmerge.merging.rules.tsv import METHOD as TSV_M

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        FEDAVG,
        FEDEXP,
        FEDNOVA,
        FEDGMA,
        MEDIAN,
        CCLIP,
        KRUM,
        MULTI_KRUM,
        BULYAN,
        TRIMMED_MEAN,
        TIES,
        DARE_LINEAR,
        DARE_TIES,
        MEAN_DIRECTION,
        BREADCRUMBS,
        BREADCRUMBS_TIES,
        DELLA,
        MODEL_STOCK,
        SLERP,
        KARCHER,
        FISHER,
        REGMEAN,
        TSV_M,
        ISO_C,
        ISO_CTS,
        SCAFFOLD,
    )
}


def find_method(name: str, what: str = "method") -> Method:
    """The record of method ``name``; an unknown name is refused with the closest one and the list."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FedmergeError(f"unknown {what} {name!r}{hint}; choose one of {', '.join(METHODS)}.")
    return METHODS[name]
