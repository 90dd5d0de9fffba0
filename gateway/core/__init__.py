"""The core: what an embedding request is (prompts, controls), which models serve it (catalog), how its rows are
batched and sent (scheduler) and put together again (service), whichever transport it came by."""
