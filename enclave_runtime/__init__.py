"""Enclave driver under Gramine (DESIGN.md "Runtime"). Not built yet: it is issue 4's deliverable.

Until then, ``SplitProgram.__call__`` is the reference executor and runs every stage in-process.
"""
