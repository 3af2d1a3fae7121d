"""`python -m nanoseek.sandbox "print(2 + 2)"`: run one program (or standard input) in the sandbox and print the
result with the layers that were in force. `--allow-unisolated` runs it even where no namespaces can be made."""

import json
import sys
from dataclasses import asdict

from nanoseek.sandbox.runner import SandboxConfig, run_python

args = [a for a in sys.argv[1:] if a != "--allow-unisolated"]
config = SandboxConfig(allow_unisolated="--allow-unisolated" in sys.argv[1:])
print(json.dumps(asdict(run_python(args[0] if args else sys.stdin.read(), config=config)), indent=2))
