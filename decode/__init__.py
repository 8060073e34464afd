"""pdserve.decode: the decode role of a disaggregated cluster."""
