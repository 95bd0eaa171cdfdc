"""Tasks: one module per task family, each registered with `bench.registry.register_task`."""
