"""torch.accelerator as in torch >= 2.9: memory statistics from the device
allocator registry, where a pluggable allocator is not registered, so they
describe the idle native allocator (zeros) rather than raising."""


def memory_stats(device_index=None, /):
    return {}


def memory_allocated(device_index=None, /):
    return 0


def max_memory_allocated(device_index=None, /):
    return 0


def memory_reserved(device_index=None, /):
    return 0


def max_memory_reserved(device_index=None, /):
    return 0


def reset_peak_memory_stats(device_index=None, /):
    return None


def memory_stats_as_nested_dict(device_index=None, /):
    return {}


def empty_cache():
    # torch returns early when no device allocator is registered for CUDA.
    return None
