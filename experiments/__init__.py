"""Research analyses of TTP, not benchmarks of the product (those live in `bench/`).

Each module answers one question about test-time personalization on a finished run or checkpoint and runs as
`python -m experiments.NAME`, e.g. `python -m experiments.ttp_signal --checkpoint CK --data URL`."""
