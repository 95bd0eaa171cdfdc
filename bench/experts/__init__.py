"""Expert pools as a job sees them: loading a configured pool, training one LoRA per subtask (text and DreamBooth
subjects) and the manifest that says which experts are current.

May import: the foundation, `bench.lora`, `bench.models`, `methods`, `tasks`.
"""
