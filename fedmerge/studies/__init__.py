"""The paper's claims as studies: the shipped study sweeps, the exactness check of claim 1, and the FedNova
studies (exploratory and held-out), run into a work folder that :mod:`fedmerge.report.findings` turns into the
findings page; cached cells carry the fingerprint of the code that made them (:mod:`fedmerge.studies.fingerprint`).

This layer runs things (Flower simulations on Ray, the local trainer, the merging core); the report layer only
reads the files it leaves. Entry point: :func:`fedmerge.studies.findings.run_findings` (``fedmerge findings``).
"""

from fedmerge.studies.findings import STUDIES, run_findings

__all__ = ["STUDIES", "run_findings"]
