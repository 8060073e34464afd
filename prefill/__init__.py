"""pdserve.prefill: the prefill role of a disaggregated cluster. Arrives with issue 4."""
