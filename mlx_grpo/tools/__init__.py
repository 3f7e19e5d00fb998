"""What users run around training: evaluate, generate, export, plot."""
