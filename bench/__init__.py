"""The benchmark suite behind `make bench`: memory and connections over many downloads,
one large body, many small files, and where the time goes, all on loopback, against peers measured
in the same run. `python -m bench` writes docs/benchmarks.md and its plots.

Bench-only Celery tasks (the anti-pattern, the leak, the no-op ceiling) live in `bench.tasks` and
`bench.leaky` and are loaded into a worker with `--include`; the production task is never changed.
"""
