"""WSL2 helpers: .wslconfig management, the shutdown/restart step, the nvidia-smi health gate."""
