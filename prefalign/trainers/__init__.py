"""Trainers: thin orchestration of models, data and losses, each a step plugged into one run skeleton (run.py)."""
