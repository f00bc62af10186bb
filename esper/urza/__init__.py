"""Urza: the catalog (SQLite) and artifact store (content-addressed blobs) of a workspace.

DESIGN.md section 5. `Urza.open(workspace)` is the way in; everything else hangs off it.
"""

from esper.urza.audit import AuditCheck
from esper.urza.catalog import Urza, VerifyReport
from esper.urza.records import PolicyRecord, RequestedInterface, RunRecord
from esper.urza.store import ArtifactStore

__all__ = ["ArtifactStore", "AuditCheck", "PolicyRecord", "RequestedInterface", "RunRecord", "Urza",
           "VerifyReport"]
