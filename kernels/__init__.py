"""pdserve.kernels: Triton kernels, each beside its pure-torch reference. Arrives with issue 5."""
