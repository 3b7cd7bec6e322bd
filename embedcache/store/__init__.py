"""The HDF5 feature cache: one entry per (backbone configuration, data set) key.

- :mod:`~embedcache.store.schema`: names and constants of the layout (no h5py).
- :mod:`~embedcache.store.hdf5`: opening, safety checks and attributes every reader applies.
- :mod:`~embedcache.store.fingerprint`: the cache key (canonical-JSON sha256).
- :mod:`~embedcache.store.reader`: :class:`FeatureStore`, an entry loaded into memory.
- :mod:`~embedcache.store.writer`: :class:`StoreWriter`, building an entry crash-safely.
- :mod:`~embedcache.store.locking`: the per-entry writer lock.
- :mod:`~embedcache.store.entries`: listing, resolving and removing entries (``ls``/``info``/``rm``).
- :mod:`~embedcache.store.memo`: a small JSON memo kept in the cache directory.

Nothing here imports torch: ``embedcache ls``, ``info`` and ``rm`` work without it.
"""
