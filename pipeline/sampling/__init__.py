"""Seeded, batched text-to-image sampling: settings, items, Attend-and-Excite token indices, the sampler."""
