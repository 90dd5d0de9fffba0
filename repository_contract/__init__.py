"""What the export hands to everything downstream (the gateway, the deploy scripts, the benchmarks and the tests):
the manifest of each exported model (manifest.py). Standard library only, so that every image can carry it."""
