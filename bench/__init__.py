"""phizer's benchmarks against thumbor and nginx (issue 5): `make bench` runs bench.run."""
