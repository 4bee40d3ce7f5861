"""Trainers: thin orchestration of models, data and losses on one shared loop."""
