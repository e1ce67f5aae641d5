import ctypes

cu_device = ctypes.c_int
cu_device_ptr = ctypes.c_size_t
cu_context = ctypes.c_void_p
CU_STREAM_DEFAULT = 0
