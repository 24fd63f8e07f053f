"""The enclave's caching CPU allocator (``enclave_runtime/allocator.py``): built by ``make``,
it serves torch's allocations from its free lists with torch's alignment, bounds what it keeps,
and changes no result. Each check runs in a fresh interpreter: installing it is for the whole
process, and the suite's other tests run on torch's own."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from enclave_runtime import allocator

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_library_is_built_by_the_install():
    # `make` builds it (python -m partitioner.native): a missing build step fails here
    assert allocator.LIBRARY.is_file()


def test_it_reuses_freed_blocks_aligned_and_keeps_at_most_its_limit():
    out = _run(
        """
        import torch
        from enclave_runtime import allocator
        assert not allocator.active()
        assert allocator.install() is None and allocator.active()
        assert allocator.install() is None  # idempotent
        sizes = [1, 15, 16, 17, 1000, 4096, 4097, 1 << 20, 5 << 20]
        for n in sizes:  # 5 MiB is beyond its largest class: allocated at its own size
            t = torch.arange(n, dtype=torch.int32)
            assert t.data_ptr() % 64 == 0, n
            assert int(t[-1]) == n - 1 and int(t.sum(dtype=torch.int64)) == n * (n - 1) // 2
        assert torch.empty(0).data_ptr() == 0
        a = torch.empty(1000)
        where = a.data_ptr()
        del a
        before = allocator.stats()["hits"]
        b = torch.empty(900)  # the same class: the block just freed
        assert b.data_ptr() == where and allocator.stats()["hits"] == before + 1
        blocks = [torch.empty(1 << 18) for _ in range(200)]  # 200 MiB, freed at once
        del blocks
        assert allocator.stats()["cached"] <= 64 << 20
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_a_split_computes_the_same_bits_with_it():
    """A ``slalom`` split of the tiny Llama, run with the same seed before and after the
    install: every output bit for bit equal."""
    out = _run(
        """
        import sys, warnings
        sys.path.insert(0, "tests")
        import torch
        from conftest import captured
        from enclave_runtime import allocator
        from partitioner.api import partition
        warnings.simplefilter("ignore")
        split = partition(captured("tiny-llama"), "slalom", seed=5)
        ids = torch.tensor([[5, 9, 3, 17, 2, 8, 11]])

        def outputs():
            ex = split.executor(seed=7)
            with torch.no_grad():
                return [ex(input_ids=ids) for _ in range(3)]

        def flat(values):
            return [t for v in values for t in torch.utils._pytree.tree_leaves(v)
                    if isinstance(t, torch.Tensor)]

        plain = flat(outputs())
        assert allocator.install() is None
        cached = flat(outputs())
        assert allocator.stats()["hits"] > 0
        assert len(plain) == len(cached) > 0
        assert all(torch.equal(a, b) for a, b in zip(plain, cached))
        print("same")
        """
    )
    assert out.strip() == "same"


def test_install_says_why_when_the_library_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(allocator, "LIBRARY", tmp_path / "missing.so")
    why = allocator.install()
    assert why is not None and "missing.so" in why and "partitioner.native" in why


def test_an_enclave_process_is_started_with_glibcs_cache_sized_for_compiled_stages():
    env = allocator.environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": allocator.TUNABLES}
    assert allocator.tuned(env) and not allocator.tuned({"PATH": "/bin"})
    # other tunables are kept, the setting appended to them
    other = allocator.environment({"GLIBC_TUNABLES": "glibc.malloc.mxfast=0"})
    assert other["GLIBC_TUNABLES"] == f"glibc.malloc.mxfast=0:{allocator.TUNABLES}"
    # a user's own cache size is theirs
    own = {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}
    assert allocator.environment(own) == own and allocator.tuned(own)
    # a value glibc would not read as a count (it reads 0: no cache) is not a setting
    assert not allocator.tuned({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=abc"})


def test_the_enclave_process_says_when_it_was_started_without_it(monkeypatch):
    monkeypatch.setattr(allocator, "install", lambda: None)  # this process keeps torch's own
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert any(allocator.TUNABLES in note for note in allocator.prepare())
    monkeypatch.setenv("GLIBC_TUNABLES", allocator.TUNABLES)
    assert not any("GLIBC_TUNABLES" in note for note in allocator.prepare())
