class CudaDriverError(Exception):
    pass


class CudaSupportError(ImportError):
    pass
