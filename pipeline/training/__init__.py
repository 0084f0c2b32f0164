"""TokenCompose fine-tuning (SPEC §1.1, §1.5): settings, records, data, losses, checkpoints and the loop."""
