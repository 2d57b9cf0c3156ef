"""phizer's benchmarks (issue 5): `make bench` runs bench.run; see bench/README.md."""
