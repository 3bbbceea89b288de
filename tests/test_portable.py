"""Windows-safe code, checked on Linux: every module imports with the POSIX-only standard modules hidden, and the
portable folder lock (filelock's OS lock) still stops a second process and is taken over after its holder dies.

Nothing here runs on Windows: this is as far as a Linux CI can go (the README says so)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from embedkit.errors import EmbedkitError
from embedkit.guards import folder_lock

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_every_module_imports_without_fcntl_or_resource():
    r = subprocess.run([sys.executable, str(REPO / ".ci" / "import_without_posix.py")], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert " 0 failed" in r.stderr and "fcntl" in r.stderr
    count = int(r.stderr.split("imported ", 1)[1].split()[0])
    assert count > 80  # every module was walked, not only the package


def test_the_shim_catches_a_module_level_fcntl_import(tmp_path):
    # the check itself must be able to fail: a package that imports fcntl at its top, as guards.py did
    pkg = tmp_path / "embedkit_probe"
    (pkg).mkdir()
    (pkg / "__init__.py").write_text("")
    script = textwrap.dedent(f"""
        import sys, runpy
        sys.path.insert(0, {str(REPO / '.ci')!r})
        import import_without_posix as shim
        import builtins
        builtins.__import__ = shim._windows_like_import
        try:
            exec("import fcntl", {{"__name__": "embedkit.probe"}})
        except ImportError as e:
            print("refused:", e)
        exec("import fcntl", {{"__name__": "some_library"}})  # third-party code is not judged
        print("library ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=60)
    assert "refused: No module named 'fcntl'" in r.stdout and "library ok" in r.stdout, r.stdout + r.stderr


HOLD = textwrap.dedent("""
    import sys, time
    from embedkit.guards import folder_lock
    with folder_lock(sys.argv[1], "test folder"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_lock_held_by_another_process_refuses_then_is_taken_over_when_it_dies(tmp_path):
    lock = tmp_path / ".embedkit.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(EmbedkitError, match=rf"in use by another embedkit run \(pid {holder.pid} on "):
            with folder_lock(lock, "test folder"):
                pass
    finally:
        holder.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no cleanup runs
        holder.wait(timeout=30)
    assert lock.exists()  # left behind by the killed holder, its lock released by the OS
    with folder_lock(lock, "test folder"):
        assert lock.read_bytes().startswith(b" {")  # byte 0 is the locked pad byte, then the holder
    assert not lock.exists()
