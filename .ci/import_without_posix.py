"""Import every embedkit module as Windows would: with the POSIX-only standard modules missing.

Run by .ci/run and tests/test_portable.py. A module that imports fcntl, resource, termios, pwd or grp at
its top level fails here with ImportError, as it would on Windows; imports inside functions (behind a
platform check or a try) are not reached by importing alone. Third-party packages are not judged: the shim
hides these modules from embedkit's own import statements only, since a library may pick its POSIX or
Windows code at import time.
"""

from __future__ import annotations

import builtins
import importlib
import pkgutil
import sys
import time

POSIX_ONLY = {"fcntl", "resource", "termios", "tty", "pty", "pwd", "grp", "posix", "syslog", "crypt"}
_real_import = builtins.__import__


def _windows_like_import(name, globals=None, locals=None, fromlist=(), level=0):
    caller = (globals or {}).get("__name__", "")
    if level == 0 and name.split(".")[0] in POSIX_ONLY and caller.split(".")[0] == "embedkit":
        raise ImportError(f"No module named '{name}' (hidden: embedkit must import on Windows)")
    return _real_import(name, globals, locals, fromlist, level)


def main() -> int:
    builtins.__import__ = _windows_like_import
    for name in POSIX_ONLY:
        sys.modules.pop(name, None) if name != "posix" else None
    import embedkit

    t0, failed, names = time.perf_counter(), [], ["embedkit"]
    names += [m.name for m in pkgutil.walk_packages(embedkit.__path__, "embedkit.")
              if not m.name.endswith("__main__")]  # `python -m embedkit` runs the CLI
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            # an optional package that is not installed (ray, llama_cpp, ...) is not a portability failure
            if "hidden: embedkit must import on Windows" in str(e) or missing.split(".")[0] in POSIX_ONLY:
                failed.append(f"{name}: {e}")
    print(f"imported {len(names)} embedkit modules with {', '.join(sorted(POSIX_ONLY))} hidden "
          f"in {time.perf_counter() - t0:.1f} s; {len(failed)} failed", file=sys.stderr)
    for line in failed:
        print(f"  {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
