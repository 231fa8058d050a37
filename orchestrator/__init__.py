"""Ray side of the tool: compose -> validate -> plan -> schedule on Ray -> track in MLflow -> report.

    python -m orchestrator +sweep=lora_rank [KEY=VALUE ...]
"""
