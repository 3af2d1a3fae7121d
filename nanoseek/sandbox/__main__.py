"""`python -m nanoseek.sandbox "print(2 + 2)"`: run one program (or standard input) in the sandbox and print the
result with the layers that were in force."""

import json
import sys
from dataclasses import asdict

from nanoseek.sandbox.runner import run_python

print(json.dumps(asdict(run_python(sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read())), indent=2))
