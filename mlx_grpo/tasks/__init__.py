"""Example tasks and models: the arithmetic task, SmolLM2, the tiny demo model, the quickstart."""
