"""Model-written code run in a separate process with limits (`runner.py` starts and watches it, `child.py` is
the process that confines itself, `boot.py` the fresh interpreter it then execs to run the program).

Imports: the standard library and `nanoseek.errors` only.
"""

from nanoseek.sandbox.runner import SandboxConfig, SandboxError, SandboxResult, run_many, run_python

__all__ = ["SandboxConfig", "SandboxError", "SandboxResult", "run_many", "run_python"]
