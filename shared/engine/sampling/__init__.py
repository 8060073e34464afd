"""Building blocks of the sampler (`pdserve.shared.engine.sampler`): logit penalties, the
top-k/top-p/min-p filters, per-row seeded noise, and logprob gathering. Each module is pure torch
over a [rows, vocab] float32 tensor plus per-row host lists; the ordering of the steps and the
public API live in `sampler.py`.

May import: torch only.
"""
