/* Fused single-pass sums for the weight difference of one tensor pair (METHODS.md §7).
 *
 * For a base a and a descendant b of n elements, each fixed block of `block` elements
 * gets four float64 sums written to out[4k .. 4k+3]:
 *     sum a^2,  sum b^2,  sum (b - a)^2,  sum |b - a|.
 * Elementwise work is float32 (bf16 is the top half of a float32: a shift and a bit
 * cast, exact); runs of SUB elements are summed in float32 lanes (vectorized: the
 * build allows reassociation), the runs in float64. Blocks sit at fixed offsets, so
 * results do not depend on how a tensor is cut. float64 inputs are summed in float64
 * throughout.
 *
 * a and b may point into memory-mapped checkpoint files: the work goes `window` elements
 * at a time, and each window's pages are given back after it is summed (MADV_DONTNEED:
 * the page cache keeps them, this process's RSS does not), so a whole mapped file never
 * becomes resident. Loads go through memcpy, so a tensor at any
 * byte offset of its file is read correctly.
 *
 * Built by reasondiff.metrics._weights_kernel on first use with the machine's C
 * compiler and called through ctypes, which releases the GIL: the page faults and the
 * sums of two reader threads run in parallel. No NaN/Inf assumptions are compiled in: a
 * non-finite weight reaches the sums, and the caller names it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#define SUB 256

static inline float f32_of(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t word_at(const unsigned char *p, int64_t i)
{
    uint32_t w;
    memcpy(&w, p + 4 * i, sizeof w);
    return w;
}

/* bf16 values two at a time (one 32-bit word: shifts and masks only); n counts words. */
static void bf16_words(const unsigned char *a, const unsigned char *b, int64_t n, int64_t block,
                       double *out)
{
    for (int64_t lo = 0; lo < n; lo += block, out += 4) {
        int64_t hi = lo + block < n ? lo + block : n;
        double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int64_t j = lo; j < hi; j += SUB / 2) {
            int64_t end = j + SUB / 2 < hi ? j + SUB / 2 : hi;
            float p0 = 0, p1 = 0, p2 = 0, p3 = 0;
            for (int64_t i = j; i < end; ++i) {
                uint32_t wa = word_at(a, i), wb = word_at(b, i);
                float x0 = f32_of(wa << 16), x1 = f32_of(wa & 0xFFFF0000u);
                float y0 = f32_of(wb << 16), y1 = f32_of(wb & 0xFFFF0000u);
                float d0 = y0 - x0, d1 = y1 - x1;
                p0 += x0 * x0 + x1 * x1;
                p1 += y0 * y0 + y1 * y1;
                p2 += d0 * d0 + d1 * d1;
                p3 += fabsf(d0) + fabsf(d1);
            }
            s0 += p0;
            s1 += p1;
            s2 += p2;
            s3 += p3;
        }
        out[0] = s0;
        out[1] = s1;
        out[2] = s2;
        out[3] = s3;
    }
}

/* float32 (runs in float32) and float64 (float64 throughout); n counts elements. */
#define FLOAT_SUMS(NAME, T, ABS)                                                           \
    static void NAME(const unsigned char *a, const unsigned char *b, int64_t n,            \
                     int64_t block, double *out)                                           \
    {                                                                                      \
        for (int64_t lo = 0; lo < n; lo += block, out += 4) {                              \
            int64_t hi = lo + block < n ? lo + block : n;                                  \
            double s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                         \
            for (int64_t j = lo; j < hi; j += SUB) {                                       \
                int64_t end = j + SUB < hi ? j + SUB : hi;                                 \
                T p0 = 0, p1 = 0, p2 = 0, p3 = 0;                                          \
                for (int64_t i = j; i < end; ++i) {                                        \
                    T x, y, d;                                                             \
                    memcpy(&x, a + sizeof(T) * i, sizeof x);                               \
                    memcpy(&y, b + sizeof(T) * i, sizeof y);                               \
                    d = y - x;                                                             \
                    p0 += x * x;                                                           \
                    p1 += y * y;                                                           \
                    p2 += d * d;                                                           \
                    p3 += ABS(d);                                                          \
                }                                                                          \
                s0 += p0;                                                                  \
                s1 += p1;                                                                  \
                s2 += p2;                                                                  \
                s3 += p3;                                                                  \
            }                                                                              \
            out[0] = s0;                                                                   \
            out[1] = s1;                                                                   \
            out[2] = s2;                                                                   \
            out[3] = s3;                                                                   \
        }                                                                                  \
    }

FLOAT_SUMS(f32_values, float, fabsf)
FLOAT_SUMS(f64_values, double, fabs)

/* Bytes given back on either side of a window besides the window itself: the kernel's
 * fault-around maps the aligned 64 KiB block around a faulting address, which reaches
 * into the previous window (already given back) and the next. */
#define SLACK ((uintptr_t)1 << 20)

/* madvise(advice) over the pages of [p - slack, p + bytes + slack), clamped to the
 * mapping [lo_bound, hi_bound) (its start is page aligned and its last page is whole in
 * memory), partial pages at either end included. */
static void advise(const unsigned char *p, int64_t bytes, uintptr_t slack,
                   const unsigned char *lo_bound, const unsigned char *hi_bound, int advice)
{
#if defined(__unix__) || defined(__APPLE__)
    long page_size = sysconf(_SC_PAGESIZE);
    if (page_size <= 0 || bytes <= 0)
        return;
    uintptr_t page = (uintptr_t)page_size;
    uintptr_t start = (uintptr_t)p, end = start + (uintptr_t)bytes;
    uintptr_t lo = start - (uintptr_t)lo_bound > slack ? start - slack : (uintptr_t)lo_bound;
    uintptr_t hi = (uintptr_t)hi_bound - end > slack ? end + slack : (uintptr_t)hi_bound;
    lo = lo / page * page;
    hi = (hi + page - 1) / page * page;
    if (hi > lo)
        madvise((void *)lo, hi - lo, advice);
#else
    (void)p;
    (void)bytes;
    (void)slack;
    (void)lo_bound;
    (void)hi_bound;
    (void)advice;
#endif
}

/* Give back a summed window's pages, with SLACK (MADV_DONTNEED: the page cache keeps
 * them, this process's RSS does not). Safe while another reader is using them: the
 * mapping is never written, so the next load maps the same bytes again. */
static void drop_pages(const unsigned char *p, int64_t bytes, const unsigned char *lo_bound,
                       const unsigned char *hi_bound)
{
#if defined(MADV_DONTNEED)
    advise(p, bytes, SLACK, lo_bound, hi_bound, MADV_DONTNEED);
#endif
}

/* Ask for a window to be read ahead (asynchronously): on a cold page cache a fault would
 * otherwise read a small block at a time and wait for each (2x the time of `cat`,
 * measured); pages already cached cost a lookup. */
static void read_ahead(const unsigned char *p, int64_t bytes, const unsigned char *lo_bound,
                       const unsigned char *hi_bound)
{
#if defined(MADV_WILLNEED)
    advise(p, bytes, 0, lo_bound, hi_bound, MADV_WILLNEED);
#endif
}

typedef void (*values_fn)(const unsigned char *, const unsigned char *, int64_t, int64_t,
                          double *);

/* One side of a pair: its data, and the mapping it lies in (NULL: not mapped, nothing
 * is given back). */
typedef struct {
    const unsigned char *data, *map_lo, *map_hi;
} side;

/* The shared driver: `unit` elements per kernel item (2 for bf16 words), `size` bytes per
 * element; window and block are in elements and multiples of unit. */
static void windows(values_fn fn, int64_t unit, int64_t size, side a, side b, int64_t n,
                    int64_t block, double *out, int64_t window)
{
    if (window <= 0)
        window = n;
    if (a.map_lo)
        read_ahead(a.data, size * (window < n ? window : n), a.map_lo, a.map_hi);
    if (b.map_lo)
        read_ahead(b.data, size * (window < n ? window : n), b.map_lo, b.map_hi);
    for (int64_t lo = 0; lo < n; lo += window) {
        int64_t m = lo + window < n ? window : n - lo;
        int64_t next = lo + m, ahead = next + window < n ? window : n - next;
        if (a.map_lo && ahead > 0) /* the next window is read while this one is summed */
            read_ahead(a.data + size * next, size * ahead, a.map_lo, a.map_hi);
        if (b.map_lo && ahead > 0)
            read_ahead(b.data + size * next, size * ahead, b.map_lo, b.map_hi);
        fn(a.data + size * lo, b.data + size * lo, m / unit, block / unit, out + 4 * (lo / block));
        if (a.map_lo)
            drop_pages(a.data + size * lo, size * m, a.map_lo, a.map_hi);
        if (b.map_lo)
            drop_pages(b.data + size * lo, size * m, b.map_lo, b.map_hi);
    }
}

/* Entry points. n: elements (bf16: even; the caller adds an odd last value); block and
 * window: elements, window a multiple of block (0: all at once); out: ceil(n / block)
 * rows of 4 float64. a_map / b_map: {start, end} of the mapping each side lies in, whose
 * pages are given back window by window, or NULL for memory that is not a mapped file. */
#define ENTRY(NAME, FN, UNIT, SIZE)                                                        \
    void NAME(const void *a, const void *b, int64_t n, int64_t block, double *out,         \
              int64_t window, const void *const *a_map, const void *const *b_map)          \
    {                                                                                      \
        side sa = {a, a_map ? a_map[0] : NULL, a_map ? a_map[1] : NULL};                   \
        side sb = {b, b_map ? b_map[0] : NULL, b_map ? b_map[1] : NULL};                   \
        windows(FN, UNIT, SIZE, sa, sb, n, block, out, window);                            \
    }

ENTRY(rd_bf16_sums, bf16_words, 2, 2)
ENTRY(rd_f32_sums, f32_values, 1, 4)
ENTRY(rd_f64_sums, f64_values, 1, 8)
