"""Compiled programs (many steps per call, on device), the feeds that give them
data, data parallelism over devices, and JAX's persistent compilation cache."""
