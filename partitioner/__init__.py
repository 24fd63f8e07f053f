"""teesplit's compiler and the split program's data model.

This package imports nothing on purpose: the enclave and the GPU worker import its bottom
layer (``errors``, ``label_set``, ``policy``, ``plan``, ``dims``, ``ops``, ``rnm_tables``,
``bundle``) without pulling in the compiler. The compiler's entry points are in
``partitioner.api``: ``partition``, ``audit`` and ``load``. The layer rule is in
``docs/design.md`` and enforced by ``tests/test_layers.py``.
"""
