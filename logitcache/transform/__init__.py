"""Cache to cache, and caches to and from other tools' layouts: nothing here runs a teacher.

- :mod:`logitcache.transform.layouts`: the plain-column layouts published logit datasets use;
- :mod:`logitcache.transform.importer`: ``logitcache import``, such a dataset into a cache;
- :mod:`logitcache.transform.exporter`: ``logitcache export``, a cache into plain Parquet columns.

Every transform writes a cache in the same format through :mod:`logitcache.store`, so readers,
losses and integrations work unchanged; it never imports the dump or the trainer.
"""

from __future__ import annotations

# Nothing is imported here: the CLI reads the layout presets at start-up without loading the
# stores; import from the modules (or from ``logitcache``: import_cache, export_cache).
