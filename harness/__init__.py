"""Starting and stopping real servers on free ports, and stopping them by PID with every child: the gateway with its
Triton, PostgreSQL, Redis and Prometheus. The tests and the benchmarks both use it; neither imports the other's for
it."""
