"""What the export hands to everything downstream (the gateway, the deploy scripts, the benchmarks and the tests): the
manifest of each exported model (manifest.py), how its Triton models are named (naming.py) and the names of the
tensors they take and answer (tensors.py). Standard library only, so that every image can carry it."""
