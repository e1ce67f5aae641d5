/* A stand-in for libcuda.so, built at test time (tests/cuda_standin.rs).
 *
 * It implements exactly the driver entry points cudalloc's backend:cuda calls
 * (src/driver/cuda.rs, ENTRY_POINTS) over fake address ranges, so CI runs the
 * real CUDA code path without a GPU. It proves plumbing, not hardware.
 *
 * Environment:
 *   FAKE_CUDA_DEVICES=N          devices (default 2)
 *   FAKE_CUDA_MEMORY=BYTES       capacity per device (default 1 GiB)
 *   FAKE_CUDA_OOM_AT=N           the Nth cuMemAlloc (1-based, all devices) fails with OUT_OF_MEMORY
 *   FAKE_CUDA_DEINIT_FILE=PATH   once PATH exists, every call returns CUDA_ERROR_DEINITIALIZED
 *   FAKE_CUDA_CAPTURING=HANDLE   this stream handle (hex or decimal) reports an active capture;
 *                                cuMemAlloc then fails unless the thread is in relaxed mode
 *   FAKE_CUDA_HOST_STREAMS=H,... stream handles the host program "created" (hex or decimal);
 *                                with NULL, CU_STREAM_LEGACY (1), CU_STREAM_PER_THREAD (2),
 *                                the FAKE_CUDA_CAPTURING handle and the live streams of
 *                                cuStreamCreate, the only handles a stream argument may hold
 *   FAKE_CUDA_LOG=PATH           append one line per call: "<name> ctx=<device> ..."
 *   FAKE_CUDA_ALLOC_ERROR=CODE   every cuMemAlloc fails with this raw CUresult, e.g. one no
 *                                CUDA release defines (a newer driver's code, to cudalloc)
 *   FAKE_CUDA_EVENT_LAG=N        an event answers NOT_READY to its first N queries after each
 *                                record (a GPU's event recorded a moment ago); default 0
 *   FAKE_CUDA_STREAM_BUSY=1      cuStreamQuery answers NOT_READY (work pending); by default
 *                                every stream is idle (the stand-in runs no work)
 *   FAKE_CUDA_VMM=0              the devices report no virtual memory management
 *                                (CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED 0)
 * Virtual memory (cuMemAddressReserve, cuMemCreate, cuMemMap, cuMemSetAccess, cuMemUnmap,
 * cuMemRelease, cuMemAddressFree) works in 2 MiB pages; physical handles count against
 * capacity. A broken rule is logged as VMM_VIOLATION and fails with INVALID_VALUE: a
 * size or address not a multiple of the page, a map outside a reserved range, over a
 * mapping or past its handle's end, an unmap of anything but one whole mapping, access
 * asked for a range that is not whole mappings or for no device, a release of a handle
 * still mapped, a reserved range freed with mappings in it, an unknown handle.
 * cuMemUnmap, cuMemRelease and cuMemAddressFree while a stream captures are logged as
 * CAPTURE_VIOLATION; cuMemCreate, cuMemMap and cuMemSetAccess then need relaxed mode.
 * cuStreamQuery or cuStreamSynchronize on a capturing stream, cuMemFree while any
 * stream captures (it synchronises the context), cuMemGetInfo then outside relaxed
 * mode, and cuStreamQuery, cuStreamSynchronize or cuEventRecord on the legacy stream
 * (NULL or CU_STREAM_LEGACY) while another stream captures are logged as
 * CAPTURE_VIOLATION and fail (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, or _IMPLICIT for
 * the legacy stream): on a GPU they would invalidate the capture (the memory stays
 * allocated). cuStreamIsCapturing on the legacy stream then answers
 * CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, as a GPU's driver does. An
 * event recorded on a capturing stream is a node of the graph, not a record: querying
 * it fails with CUDA_ERROR_CAPTURED_EVENT, as on a GPU.
 * cuGetErrorString answers codes >= 1000 as the real driver answers unknown
 * ones: CUDA_ERROR_INVALID_VALUE, and the string pointer set to NULL.
 * Strictness: memory calls need a current context; a free or record on another
 * device's context is logged as WRONG_CTX (a real driver would accept some of
 * these; cudalloc must never make them). A stream argument that is no stream
 * (see FAKE_CUDA_HOST_STREAMS; destroyed ones included) is logged as BAD_STREAM
 * and fails with CUDA_ERROR_INVALID_HANDLE: a real driver takes the handle for
 * a pointer and may crash on it. */
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef unsigned long long CUdeviceptr;

enum {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    DEINITIALIZED = 4,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_READY = 600,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_IMPLICIT = 906,
    CAPTURED_EVENT = 907,
};

#define MAX_DEV 8
#define MAX_LIVE 65536
#define CTX_BASE 0x1000

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int cur_dev = -1;
static __thread int capture_mode = 0; /* 0 global, 1 thread-local, 2 relaxed */
static int ndev = 2;
static unsigned long long capacity = 1ull << 30;
static unsigned long long used[MAX_DEV];
static unsigned long long next_addr[MAX_DEV];
static struct {
    CUdeviceptr p;
    unsigned long long n;
    int dev;
} live[MAX_LIVE];
static int nlive = 0;
static long allocs = 0;
static uintptr_t next_handle = 0x100000;
static int configured = 0;

static void configure(void) {
    if (configured) return;
    configured = 1;
    const char *s;
    if ((s = getenv("FAKE_CUDA_DEVICES"))) ndev = atoi(s);
    if (ndev > MAX_DEV) ndev = MAX_DEV;
    if ((s = getenv("FAKE_CUDA_MEMORY"))) capacity = strtoull(s, NULL, 0);
    for (int d = 0; d < MAX_DEV; d++) next_addr[d] = 0x700000000000ull + ((unsigned long long)d << 40);
}

static void logf_(const char *fmt, ...) {
    const char *path = getenv("FAKE_CUDA_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static int deinit(void) {
    const char *path = getenv("FAKE_CUDA_DEINIT_FILE");
    return path && access(path, F_OK) == 0;
}

#define ENTER(name)                                  \
    pthread_mutex_lock(&lock);                       \
    configure();                                     \
    if (deinit()) {                                  \
        logf_("%s DEINITIALIZED", name);             \
        pthread_mutex_unlock(&lock);                 \
        return DEINITIALIZED;                        \
    }
#define LEAVE(r)                                     \
    do {                                             \
        pthread_mutex_unlock(&lock);                 \
        return (r);                                  \
    } while (0)

static int capturing(CUstream s) {
    const char *c = getenv("FAKE_CUDA_CAPTURING");
    return c && (uintptr_t)strtoull(c, NULL, 0) == (uintptr_t)s;
}

/* The legacy stream while another stream captures (the stand-in's capturing
 * stream counts as a blocking one): using it would join the capture. */
static int legacy_blocked(CUstream s) {
    return ((uintptr_t)s == 0 || (uintptr_t)s == 1) && getenv("FAKE_CUDA_CAPTURING") && !capturing(s);
}

/* Call with the lock held. */
#define CHECK_LEGACY(name, s)                                            \
    if (legacy_blocked(s)) {                                             \
        logf_("CAPTURE_VIOLATION %s on the legacy stream", name);       \
        LEAVE(CAPTURE_IMPLICIT);                                         \
    }

#define MAX_STREAMS 1024
static CUstream created[MAX_STREAMS]; /* live streams of cuStreamCreate */

static int host_stream(CUstream s) {
    const char *c = getenv("FAKE_CUDA_HOST_STREAMS");
    while (c && *c) {
        char *end;
        if ((uintptr_t)strtoull(c, &end, 0) == (uintptr_t)s) return 1;
        if (end == c) break;
        c = *end == ',' ? end + 1 : end;
    }
    return 0;
}

static int stream_ok(CUstream s) {
    if ((uintptr_t)s <= 2 || capturing(s) || host_stream(s)) return 1;
    for (int i = 0; i < MAX_STREAMS; i++)
        if (created[i] == s) return 1;
    return 0;
}

/* Call with the lock held. */
#define CHECK_STREAM(name, s)                                            \
    if (!stream_ok(s)) {                                                 \
        logf_("BAD_STREAM %s stream=%p", name, s);                       \
        LEAVE(INVALID_HANDLE);                                           \
    }

CUresult cuInit(unsigned flags) {
    ENTER("cuInit");
    logf_("cuInit flags=%u", flags);
    LEAVE(flags == 0 ? OK : INVALID_VALUE);
}

CUresult cuDeviceGetCount(int *count) {
    ENTER("cuDeviceGetCount");
    *count = ndev;
    LEAVE(OK);
}

CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    ENTER("cuDeviceGet");
    if (ordinal < 0 || ordinal >= ndev) LEAVE(INVALID_DEVICE);
    *dev = ordinal;
    LEAVE(OK);
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
    ENTER("cuDevicePrimaryCtxRetain");
    if (dev < 0 || dev >= ndev) LEAVE(INVALID_DEVICE);
    *ctx = (CUcontext)(uintptr_t)(CTX_BASE + dev);
    logf_("cuDevicePrimaryCtxRetain dev=%d", dev);
    LEAVE(OK);
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    ENTER("cuCtxSetCurrent");
    int d = (int)((uintptr_t)ctx - CTX_BASE);
    if (ctx == NULL) d = -1;
    else if (d < 0 || d >= ndev) LEAVE(INVALID_CONTEXT);
    cur_dev = d;
    LEAVE(OK);
}

CUresult cuCtxGetCurrent(CUcontext *ctx) {
    ENTER("cuCtxGetCurrent");
    if (!ctx) LEAVE(INVALID_VALUE);
    *ctx = cur_dev < 0 ? NULL : (CUcontext)(uintptr_t)(CTX_BASE + cur_dev);
    LEAVE(OK);
}

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    ENTER("cuMemAlloc_v2");
    if (cur_dev < 0) LEAVE(INVALID_CONTEXT);
    const char *c = getenv("FAKE_CUDA_CAPTURING");
    if (c && capture_mode != 2) {
        logf_("cuMemAlloc_v2 ctx=%d CAPTURE_UNSUPPORTED mode=%d", cur_dev, capture_mode);
        LEAVE(CAPTURE_UNSUPPORTED);
    }
    const char *raw = getenv("FAKE_CUDA_ALLOC_ERROR");
    if (raw) {
        logf_("cuMemAlloc_v2 ctx=%d size=%zu ERROR=%s", cur_dev, n, raw);
        LEAVE(atoi(raw));
    }
    allocs++;
    const char *oom = getenv("FAKE_CUDA_OOM_AT");
    if ((oom && atol(oom) == allocs) || used[cur_dev] + n > capacity || nlive == MAX_LIVE) {
        logf_("cuMemAlloc_v2 ctx=%d size=%zu OOM", cur_dev, n);
        LEAVE(OUT_OF_MEMORY);
    }
    CUdeviceptr a = next_addr[cur_dev];
    next_addr[cur_dev] += (n + 0x1fffff) & ~0x1fffffull;
    live[nlive].p = a;
    live[nlive].n = n;
    live[nlive].dev = cur_dev;
    nlive++;
    used[cur_dev] += n;
    *p = a;
    logf_("cuMemAlloc_v2 ctx=%d size=%zu ptr=0x%llx mode=%d", cur_dev, n, a, capture_mode);
    LEAVE(OK);
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    ENTER("cuMemFree_v2");
    if (cur_dev < 0) LEAVE(INVALID_CONTEXT);
    if (getenv("FAKE_CUDA_CAPTURING")) {
        logf_("CAPTURE_VIOLATION cuMemFree_v2 ptr=0x%llx", p);
        LEAVE(CAPTURE_UNSUPPORTED);
    }
    for (int i = 0; i < nlive; i++) {
        if (live[i].p == p) {
            if (live[i].dev != cur_dev) logf_("WRONG_CTX cuMemFree_v2 ptr=0x%llx of device %d in ctx %d", p, live[i].dev, cur_dev);
            used[live[i].dev] -= live[i].n;
            logf_("cuMemFree_v2 ctx=%d ptr=0x%llx size=%llu", cur_dev, p, live[i].n);
            live[i] = live[--nlive];
            LEAVE(OK);
        }
    }
    logf_("BAD_FREE cuMemFree_v2 ptr=0x%llx", p);
    LEAVE(INVALID_VALUE);
}

CUresult cuMemGetInfo_v2(size_t *free_, size_t *total) {
    ENTER("cuMemGetInfo_v2");
    if (cur_dev < 0) LEAVE(INVALID_CONTEXT);
    if (getenv("FAKE_CUDA_CAPTURING") && capture_mode != 2) {
        logf_("CAPTURE_VIOLATION cuMemGetInfo_v2 mode=%d", capture_mode);
        LEAVE(CAPTURE_UNSUPPORTED);
    }
    logf_("cuMemGetInfo_v2 ctx=%d", cur_dev);
    *free_ = capacity - used[cur_dev];
    *total = capacity;
    LEAVE(OK);
}

CUresult cuEventCreate(CUevent *e, unsigned flags) {
    ENTER("cuEventCreate");
    if (cur_dev < 0) LEAVE(INVALID_CONTEXT);
    /* Handles remember their device: low byte. */
    next_handle += 0x100;
    *e = (CUevent)(next_handle | (uintptr_t)cur_dev);
    logf_("cuEventCreate ctx=%d flags=%u", cur_dev, flags);
    LEAVE(OK);
}

/* Per event: queries left to answer NOT_READY (FAKE_CUDA_EVENT_LAG), and whether
 * it was last recorded on a capturing stream. */
#define MAX_EVENTS 4096
static struct {
    CUevent e;
    long lag;
    int captured; /* last recorded on a capturing stream */
} lagging[MAX_EVENTS];

CUresult cuEventRecord(CUevent e, CUstream s) {
    ENTER("cuEventRecord");
    CHECK_STREAM("cuEventRecord", s);
    CHECK_LEGACY("cuEventRecord", s);
    if ((int)((uintptr_t)e & 0xff) != cur_dev) logf_("WRONG_CTX cuEventRecord event of device %d in ctx %d", (int)((uintptr_t)e & 0xff), cur_dev);
    logf_("cuEventRecord ctx=%d stream=%p", cur_dev, s);
    const char *lag = getenv("FAKE_CUDA_EVENT_LAG");
    int slot = -1;
    for (int i = 0; i < MAX_EVENTS && slot < 0; i++)
        if (lagging[i].e == e) slot = i;
    for (int i = 0; i < MAX_EVENTS && slot < 0; i++)
        if (!lagging[i].e) slot = i;
    if (slot >= 0) {
        lagging[slot].e = e;
        lagging[slot].lag = lag ? atol(lag) : 0;
        lagging[slot].captured = capturing(s);
    }
    LEAVE(OK);
}

CUresult cuEventQuery(CUevent e) {
    ENTER("cuEventQuery");
    for (int i = 0; i < MAX_EVENTS; i++) {
        if (lagging[i].e == e && lagging[i].captured) {
            logf_("cuEventQuery ctx=%d CAPTURED_EVENT", cur_dev);
            LEAVE(CAPTURED_EVENT);
        }
        if (lagging[i].e == e && lagging[i].lag > 0) {
            lagging[i].lag--;
            logf_("cuEventQuery ctx=%d NOT_READY", cur_dev);
            LEAVE(NOT_READY);
        }
    }
    logf_("cuEventQuery ctx=%d ready", cur_dev);
    LEAVE(OK); /* events complete at once, unless lagging */
}

CUresult cuEventSynchronize(CUevent e) {
    ENTER("cuEventSynchronize");
    (void)e;
    LEAVE(OK);
}

CUresult cuEventDestroy_v2(CUevent e) {
    ENTER("cuEventDestroy_v2");
    (void)e;
    LEAVE(OK);
}

CUresult cuStreamSynchronize(CUstream s) {
    ENTER("cuStreamSynchronize");
    CHECK_STREAM("cuStreamSynchronize", s);
    CHECK_LEGACY("cuStreamSynchronize", s);
    if (capturing(s)) {
        logf_("CAPTURE_VIOLATION cuStreamSynchronize stream=%p", s);
        LEAVE(CAPTURE_UNSUPPORTED);
    }
    logf_("cuStreamSynchronize ctx=%d stream=%p", cur_dev, s);
    LEAVE(OK);
}

CUresult cuStreamQuery(CUstream s) {
    ENTER("cuStreamQuery");
    CHECK_STREAM("cuStreamQuery", s);
    CHECK_LEGACY("cuStreamQuery", s);
    if (capturing(s)) {
        logf_("CAPTURE_VIOLATION cuStreamQuery stream=%p", s);
        LEAVE(CAPTURE_UNSUPPORTED);
    }
    int busy = getenv("FAKE_CUDA_STREAM_BUSY") != NULL;
    logf_("cuStreamQuery ctx=%d stream=%p %s", cur_dev, s, busy ? "NOT_READY" : "idle");
    LEAVE(busy ? NOT_READY : OK);
}

CUresult cuStreamIsCapturing(CUstream s, int *status) {
    ENTER("cuStreamIsCapturing");
    CHECK_STREAM("cuStreamIsCapturing", s);
    if (legacy_blocked(s)) {
        logf_("cuStreamIsCapturing ctx=%d stream=%p IMPLICIT", cur_dev, s);
        LEAVE(CAPTURE_IMPLICIT);
    }
    *status = capturing(s) ? 1 : 0;
    logf_("cuStreamIsCapturing ctx=%d stream=%p %d", cur_dev, s, *status);
    LEAVE(OK);
}

CUresult cuStreamCreate(CUstream *s, unsigned flags) {
    ENTER("cuStreamCreate");
    (void)flags;
    int slot = 0;
    while (slot < MAX_STREAMS && created[slot]) slot++;
    if (slot == MAX_STREAMS) LEAVE(OUT_OF_MEMORY);
    next_handle += 0x100;
    *s = (CUstream)next_handle;
    created[slot] = *s;
    logf_("cuStreamCreate ctx=%d stream=%p", cur_dev, *s);
    LEAVE(OK);
}

CUresult cuStreamDestroy_v2(CUstream s) {
    ENTER("cuStreamDestroy_v2");
    for (int i = 0; i < MAX_STREAMS; i++) {
        if (s && created[i] == s) {
            created[i] = NULL;
            logf_("cuStreamDestroy_v2 ctx=%d stream=%p", cur_dev, s);
            LEAVE(OK);
        }
    }
    logf_("BAD_STREAM cuStreamDestroy_v2 stream=%p", s);
    LEAVE(INVALID_HANDLE);
}

CUresult cuThreadExchangeStreamCaptureMode(int *mode) {
    ENTER("cuThreadExchangeStreamCaptureMode");
    int old = capture_mode;
    capture_mode = *mode;
    *mode = old;
    logf_("cuThreadExchangeStreamCaptureMode new=%d old=%d", capture_mode, old);
    LEAVE(OK);
}

CUresult cuGetErrorString(CUresult r, const char **s) {
    if (r >= 1000) {
        *s = NULL;
        return 1; /* CUDA_ERROR_INVALID_VALUE */
    }
    static char buf[64];
    snprintf(buf, sizeof buf, "fake libcuda error %d", r);
    *s = buf;
    return OK;
}

/* ---- Virtual memory ---- */

#define PAGE (2ull << 20)
#define MAX_VMM 4096
static struct { CUdeviceptr p; unsigned long long n; int dev; } ranges[MAX_VMM];
static int nranges = 0;
static struct { unsigned long long h, n, mapped; int dev; } handles[MAX_VMM];
static int nhandles = 0;
static struct { CUdeviceptr p; unsigned long long n; unsigned long long h; int access; } maps[MAX_VMM];
static int nmaps = 0;
static unsigned long long next_phys = 0x5000;

typedef struct { int type; int id; } MemLocation;
typedef struct {
    int type;
    int requestedHandleTypes;
    MemLocation location;
    void *win32HandleMetaData;
    unsigned char allocFlags[8];
} AllocationProp;
typedef struct { MemLocation location; int flags; } AccessDesc;

#define VMM_FAIL(...)                     \
    do {                                  \
        logf_("VMM_VIOLATION " __VA_ARGS__); \
        LEAVE(INVALID_VALUE);             \
    } while (0)

static int vmm_on(void) {
    const char *v = getenv("FAKE_CUDA_VMM");
    return !v || atoi(v) != 0;
}

/* A capture is under way: the calls that would invalidate it fail. */
#define NO_CAPTURE(name)                                 \
    if (getenv("FAKE_CUDA_CAPTURING")) {                 \
        logf_("CAPTURE_VIOLATION %s", name);             \
        LEAVE(CAPTURE_UNSUPPORTED);                      \
    }
#define RELAXED_IN_CAPTURE(name)                                      \
    if (getenv("FAKE_CUDA_CAPTURING") && capture_mode != 2) {         \
        logf_("%s CAPTURE_UNSUPPORTED mode=%d", name, capture_mode);   \
        LEAVE(CAPTURE_UNSUPPORTED);                                    \
    }

static int mapped_overlap(CUdeviceptr p, unsigned long long n) {
    for (int i = 0; i < nmaps; i++)
        if (maps[i].p < p + n && p < maps[i].p + maps[i].n) return 1;
    return 0;
}

CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice dev) {
    ENTER("cuDeviceGetAttribute");
    if (!v || dev < 0 || dev >= ndev) LEAVE(INVALID_VALUE);
    *v = attr == 102 ? vmm_on() : 0;
    LEAVE(OK);
}

CUresult cuMemGetAllocationGranularity(size_t *g, const AllocationProp *prop, int option) {
    ENTER("cuMemGetAllocationGranularity");
    if (!g || !prop || prop->type != 1 || prop->location.type != 1 || prop->location.id < 0 ||
        prop->location.id >= ndev || option != 0)
        VMM_FAIL("cuMemGetAllocationGranularity: bad property");
    *g = PAGE;
    LEAVE(OK);
}

CUresult cuMemAddressReserve(CUdeviceptr *p, size_t n, size_t align, CUdeviceptr addr, unsigned long long flags) {
    ENTER("cuMemAddressReserve");
    if (cur_dev < 0) LEAVE(INVALID_CONTEXT);
    if (!p || n == 0 || n % PAGE || align || addr || flags || nranges == MAX_VMM)
        VMM_FAIL("cuMemAddressReserve size=%zu", n);
    CUdeviceptr a = next_addr[cur_dev];
    next_addr[cur_dev] += n + PAGE; /* a guard page: ranges are never adjacent */
    ranges[nranges].p = a;
    ranges[nranges].n = n;
    ranges[nranges].dev = cur_dev;
    nranges++;
    *p = a;
    logf_("cuMemAddressReserve ctx=%d size=%zu ptr=0x%llx", cur_dev, n, a);
    LEAVE(OK);
}

CUresult cuMemAddressFree(CUdeviceptr p, size_t n) {
    ENTER("cuMemAddressFree");
    NO_CAPTURE("cuMemAddressFree");
    for (int i = 0; i < nranges; i++) {
        if (ranges[i].p == p && ranges[i].n == n) {
            if (mapped_overlap(p, n)) VMM_FAIL("cuMemAddressFree 0x%llx with memory mapped in it", p);
            ranges[i] = ranges[--nranges];
            logf_("cuMemAddressFree ptr=0x%llx size=%zu", p, n);
            LEAVE(OK);
        }
    }
    VMM_FAIL("cuMemAddressFree 0x%llx+%zu: not a reserved range", p, n);
}

CUresult cuMemCreate(unsigned long long *h, size_t n, const AllocationProp *prop, unsigned long long flags) {
    ENTER("cuMemCreate");
    RELAXED_IN_CAPTURE("cuMemCreate");
    if (!h || !prop || prop->type != 1 || prop->location.type != 1 || prop->location.id < 0 ||
        prop->location.id >= ndev || n == 0 || n % PAGE || flags || nhandles == MAX_VMM)
        VMM_FAIL("cuMemCreate size=%zu", n);
    int dev = prop->location.id;
    if (used[dev] + n > capacity) {
        logf_("cuMemCreate dev=%d size=%zu OOM", dev, n);
        LEAVE(OUT_OF_MEMORY);
    }
    used[dev] += n;
    handles[nhandles].h = ++next_phys;
    handles[nhandles].n = n;
    handles[nhandles].mapped = 0;
    handles[nhandles].dev = dev;
    nhandles++;
    *h = next_phys;
    logf_("cuMemCreate dev=%d size=%zu handle=%llu mode=%d", dev, n, next_phys, capture_mode);
    LEAVE(OK);
}

CUresult cuMemRelease(unsigned long long h) {
    ENTER("cuMemRelease");
    NO_CAPTURE("cuMemRelease");
    for (int i = 0; i < nhandles; i++) {
        if (handles[i].h == h) {
            if (handles[i].mapped) VMM_FAIL("cuMemRelease %llu still mapped", h);
            used[handles[i].dev] -= handles[i].n;
            handles[i] = handles[--nhandles];
            logf_("cuMemRelease handle=%llu", h);
            LEAVE(OK);
        }
    }
    VMM_FAIL("cuMemRelease %llu: unknown handle", h);
}

CUresult cuMemMap(CUdeviceptr p, size_t n, size_t off, unsigned long long h, unsigned long long flags) {
    ENTER("cuMemMap");
    RELAXED_IN_CAPTURE("cuMemMap");
    if (n == 0 || n % PAGE || p % PAGE || off % PAGE || flags || nmaps == MAX_VMM)
        VMM_FAIL("cuMemMap 0x%llx+%zu: misaligned", p, n);
    int in_range = 0;
    for (int i = 0; i < nranges; i++)
        if (p >= ranges[i].p && p + n <= ranges[i].p + ranges[i].n) in_range = 1;
    if (!in_range) VMM_FAIL("cuMemMap 0x%llx+%zu outside every reserved range", p, n);
    if (mapped_overlap(p, n)) VMM_FAIL("cuMemMap 0x%llx+%zu over a mapping", p, n);
    for (int i = 0; i < nhandles; i++) {
        if (handles[i].h == h) {
            if (off + n > handles[i].n) VMM_FAIL("cuMemMap past the end of handle %llu", h);
            handles[i].mapped += n;
            maps[nmaps].p = p;
            maps[nmaps].n = n;
            maps[nmaps].h = h;
            maps[nmaps].access = 0;
            nmaps++;
            logf_("cuMemMap ptr=0x%llx size=%zu handle=%llu offset=%zu mode=%d", p, n, h, off, capture_mode);
            LEAVE(OK);
        }
    }
    VMM_FAIL("cuMemMap: unknown handle %llu", h);
}

CUresult cuMemUnmap(CUdeviceptr p, size_t n) {
    ENTER("cuMemUnmap");
    NO_CAPTURE("cuMemUnmap");
    for (int i = 0; i < nmaps; i++) {
        if (maps[i].p == p && maps[i].n == n) {
            for (int j = 0; j < nhandles; j++)
                if (handles[j].h == maps[i].h) handles[j].mapped -= n;
            maps[i] = maps[--nmaps];
            logf_("cuMemUnmap ptr=0x%llx size=%zu", p, n);
            LEAVE(OK);
        }
    }
    VMM_FAIL("cuMemUnmap 0x%llx+%zu: not one whole mapping", p, n);
}

CUresult cuMemSetAccess(CUdeviceptr p, size_t n, const AccessDesc *desc, size_t count) {
    ENTER("cuMemSetAccess");
    RELAXED_IN_CAPTURE("cuMemSetAccess");
    if (!desc || count == 0) VMM_FAIL("cuMemSetAccess: no descriptor");
    for (size_t k = 0; k < count; k++)
        if (desc[k].location.type != 1 || desc[k].location.id < 0 || desc[k].location.id >= ndev || desc[k].flags != 3)
            VMM_FAIL("cuMemSetAccess: bad descriptor");
    /* Whole mappings, back to back, covering the range exactly: checked
     * first, so that a refused call grants nothing. */
    for (int mark = 0; mark < 2; mark++) {
        CUdeviceptr at = p;
        int progress = 1;
        while (at < p + n && progress) {
            progress = 0;
            for (int i = 0; i < nmaps; i++) {
                if (maps[i].p == at) {
                    if (mark) maps[i].access = 1;
                    at += maps[i].n;
                    progress = 1;
                    break;
                }
            }
        }
        if (at != p + n) VMM_FAIL("cuMemSetAccess 0x%llx+%zu: not whole mappings", p, n);
    }
    logf_("cuMemSetAccess ptr=0x%llx size=%zu mode=%d", p, n, capture_mode);
    LEAVE(OK);
}
