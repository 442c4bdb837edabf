"""The audit trail of explanations (issue #16): what the model said, and why.

The batch flow's interface (no TorchServe import anywhere in this package)::

    from tsexplain.serving.audit import AuditEntry, AuditSettings, AuditTrail, AuditUnavailable

    # initialize: settings from the model config's explain.audit mapping + environment
    settings = AuditSettings.load(explain_section.get("audit"), model_name, os.environ)
    trail = AuditTrail.open(settings, model_name=..., model_version=..., mar_sha256=...) \\
        if settings.enabled else None           # StoreError: the model fails to load (on_failure: fail)

    # once per batch, on the explanation path only, before the answers leave the worker:
    entries = [AuditEntry(...) for each explanation to answer if trail.selects(its priority value)]
    try:
        ids = trail.record(entries)             # committed; one id per entry, in order
    except AuditUnavailable as exc:             # on_failure: fail -> answer exc (503) for these
        ...
    # on_failure: serve -> ids holds None for lost records: answer without an id and add
    # ids.count(None) to the AuditRecordsLost metric (the trail has logged the line).
    # Each answered explanation carries "explanation_id": id.

    trail.close()                               # at worker shutdown, best effort

Modules: ``settings`` (``explain.audit``), ``record`` (entries, record bodies,
canonical JSON), ``chain`` (hashes, verify), ``store`` (shared SQL), ``sqlite`` and
``postgres`` (the sinks), ``trail`` (the writer). Design: docs/audit.md.
"""
from .chain import GENESIS, Break, Report, StoredRecord, link_hash
from .record import AuditEntry, ModelIdentity, canonical_json
from .settings import AuditSettings
from .store import Filters, StoreError, open_store
from .trail import AuditTrail, AuditUnavailable, make_writer_id

__all__ = [
    "AuditEntry", "AuditSettings", "AuditTrail", "AuditUnavailable", "Break", "Filters", "GENESIS", "ModelIdentity",
    "Report", "StoreError", "StoredRecord", "canonical_json", "link_hash", "make_writer_id", "open_store",
]
