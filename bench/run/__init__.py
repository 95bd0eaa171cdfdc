"""Running jobs: the Hydra CLI (`python -m bench`), config validation, the runner, records and their keys (config
and input digests), tracking, sweep summaries, the end-of-job report, and `python -m bench.run.train_experts`.

May import: everything below it (the foundation, `bench.lora`, `bench.models`, `bench.experts`, `methods`,
`tasks`); nothing from `bench.analysis` or `bench.perf`.
"""
