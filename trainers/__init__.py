"""Ray-free fine-tuning library: models, methods (the PEFT zoo), data, stage recipes, evaluation.

One trial runs in a plain process: `python -m trainers --config trial.yaml`, or
`trainers.trial.run_trial(cfg, output_dir)`. The orchestrator wraps the same call in Ray Train.
"""
