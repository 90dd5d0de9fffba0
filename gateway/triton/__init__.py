"""The Triton side: the process the gateway starts and supervises, the clients that talk to it, and the pool that
picks a ready one."""
