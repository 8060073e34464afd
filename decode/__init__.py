"""pdserve.decode: the decode role of a disaggregated cluster. Arrives with issue 4."""
