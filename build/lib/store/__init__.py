"""The store layer: the per-person delta store, the one delta policy, and the Flower message protocol.

Every adapter (training, client, server) that writes, reads or ships deltas goes through here.
"""
