"""MultiGen (SPEC §3): settings, OWLv2 detection of sampled images, and the MG1-MG5 scores."""
