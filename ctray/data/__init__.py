"""Data layer: WebDataset shards (write, parse, Ray Data read), built-in sources, attack simulators."""
