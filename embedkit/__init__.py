"""embedkit: foundation-model embeddings and small fusion classifiers for low-resource clinics.

The public API is imported lazily so that `import embedkit` (and `embedkit --help`) stays fast.
"""

__version__ = "0.1.0"

_API = {
    "extract": ("embedkit.extract", "extract"),
    "ExtractConfig": ("embedkit.extract", "ExtractConfig"),
    "SourceOptions": ("embedkit.items", "SourceOptions"),
    "load": ("embedkit.frame", "load"),
    "load_embeddings": ("embedkit.store", "load_embeddings"),
    "read_embedding_table": ("embedkit.store", "read_embedding_table"),
    "list_models": ("embedkit.encoders.registry", "list_models"),
    "resolve_spec": ("embedkit.encoders.registry", "resolve_spec"),
    "create_encoder": ("embedkit.encoders", "create_encoder"),
    "EmbedkitError": ("embedkit.errors", "EmbedkitError"),
    "audit": ("embedkit.audit", "audit"),
    "audit_dataset": ("embedkit.audit", "audit_dataset"),
    "AuditConfig": ("embedkit.audit", "AuditConfig"),
}


def __getattr__(name):
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'embedkit' has no attribute '{name}'")


__all__ = list(_API)
