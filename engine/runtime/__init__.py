"""Kiln's runtime: sequences, paged KV blocks, scheduler, model runner, sampler, engines."""
