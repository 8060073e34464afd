"""The engine: paged KV pool, radix prefix cache, scheduler, sampler, model runner."""
