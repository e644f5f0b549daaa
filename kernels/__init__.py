"""GPU kernels and their torch references."""
