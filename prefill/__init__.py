"""pdserve.prefill: the prefill role of a disaggregated cluster."""
