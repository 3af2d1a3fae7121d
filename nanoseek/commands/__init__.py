"""Command-line entry points, one module per area; each has `register(sub, bench)` adding its subcommands
(and its `nanoseek bench ...` benchmarks) to the parser that `nanoseek.cli` builds."""
