"""torch.accelerator as in torch >= 2.9: memory statistics from the device
allocator registry, where a pluggable allocator is not registered, so they
describe the idle native allocator (zeros) rather than raising."""


def memory_stats(device_index=None):
    return {}


def memory_allocated(device_index=None):
    return 0


def max_memory_allocated(device_index=None):
    return 0


def memory_reserved(device_index=None):
    return 0


def max_memory_reserved(device_index=None):
    return 0


def reset_peak_memory_stats(device_index=None):
    return None
