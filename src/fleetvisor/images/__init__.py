"""OCI images: content store, import, safe layer unpacking, per-host layer cache, registry."""
