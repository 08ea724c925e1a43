"""kvbm as SGLang's HiCache L3 storage backend (``storage.KvbmHiCacheStorage``, see docs/sglang.md).

Importing this package does not import SGLang or torch; ``storage`` does (SGLang loads it).
"""
