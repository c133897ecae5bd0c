"""Drivers: detect (rounds), score (Ray Data map_batches), and friends."""
