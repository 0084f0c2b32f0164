"""What the next run of a sampling stage does with each failed image status (``sample@*``, ``visor@*``)."""

from __future__ import annotations

from pipeline.sampling.sampler import STATUS_FAILED, STATUS_NAN, STATUS_TOKENS_FAILED

SAMPLE_RETRIED = frozenset({STATUS_FAILED})  # sample_prompt_set's redo_statuses
SAMPLE_REMEDIES = {
    STATUS_NAN: "not retried: the same seed overflows again; set profiles.<p>.sampling.dtype: float32",
    STATUS_TOKENS_FAILED: "not retried: Attend-and-Excite finds no token of an object word; fix the prompt",
}
