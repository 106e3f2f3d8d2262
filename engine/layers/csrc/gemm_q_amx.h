/* int4 on AMX tiles (included by gemm_q.c where the compiler targets AMX-BF16): each quad of int4 codes is decoded
 * with the AVX-512 kernel's one-OR trick (128 + q as bf16) into a scratch tile of 16 pair steps x 16 outputs, which
 * is exactly the VNNI layout tdpbf16ps takes as its B operand; A is up to 16 rows of x (32 inputs), C one panel's
 * 16 outputs per row. So the decode's stores replace vdpbf16ps, the AVX-512 kernel's bottleneck. Per group the C
 * tiles are stored and folded into fp32 accumulators as in tile_kernel: acc += acc_g * s + m * sum(x over group).
 * Needs groups of a multiple of 32 inputs; the OS must grant the tile state (gemm_q_amx_init, once per process).
 */
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_MR 16 /* rows of x per A tile */
#define DEC_MAX (512 * 1024) /* bytes of decoded B tiles kept per thread (K <= 4096) */
/* Fewer rows stay on AVX-512: decoding into a tile and reading it back costs more than vdpbf16ps saves at 1-2 rows */
#define AMX_MIN_ROWS 3
#define AMX_NR 4  /* panels per block: C tiles 3..6 (A is tile 0, B tiles 1 and 2) */
#define BARRIER() __asm__ volatile("" ::: "memory") /* GCC's tileloadd / ldtilecfg do not say they read memory */

typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* 1 where this process may use AMX tiles (Linux: ARCH_REQ_XCOMP_PERM for XTILEDATA), else 0; asked once */
int gemm_q_amx_init(void) {
    static int granted = -1; /* racing first calls both ask: the answer is the same */
    int g = __atomic_load_n(&granted, __ATOMIC_RELAXED);
    if (g < 0) __atomic_store_n(&granted, g = syscall(SYS_arch_prctl, 0x1023, 18) == 0, __ATOMIC_RELAXED);
    return g;
}

static void amx_configure(int mr) { /* per thread: the tile configuration is thread state */
    TileConfig c;
    memset(&c, 0, sizeof(c));
    c.palette = 1;
    c.rows[0] = (uint8_t)mr, c.colsb[0] = 64; /* A: mr rows x 32 bf16 */
    for (int t = 1; t < 3; t++) c.rows[t] = 16, c.colsb[t] = 64; /* B: 16 pair steps x 16 bf16 pairs */
    for (int t = 3; t < 3 + AMX_NR; t++) c.rows[t] = (uint8_t)mr, c.colsb[t] = 64; /* C: mr rows x 16 fp32 */
    BARRIER();
    _tile_loadconfig(&c);
}

/* B tile T for 32 inputs (16 pair steps, 4 quads) of panel J, added as A x B to C tile C (J + 3; tile numbers are
 * literal tokens in the intrinsics): decoded into buf, or into dec (fill), or read back from dec (decoded by an
 * earlier row block) */
#define AMX_PANEL(J, T, C)                                                                                         \
    if (nr > (J)) {                                                                                             \
        vp *b = dec ? dec + ((J) * (K / 32) + k0 / 32) * 16 : buf[(J) & 1];                                     \
        if (!dec || fill) {                                                                                     \
            const uint8_t *q = codes + (J) * panel_bytes + 16 * (k0 / 2);                                       \
            for (int qd = 0; qd < 4; qd++) {                                                                    \
                if (pfn > (J)) __builtin_prefetch(q + nr * panel_bytes + 64 * qd, 0, PF4_LOCALITY);             \
                const __m512i v = load_quad(q + 64 * qd);                                                       \
                for (int s = 0; s < 4; s++) b[4 * qd + s] = decode4(v, s);                                      \
            }                                                                                                   \
        }                                                                                                       \
        BARRIER();                                                                                              \
        _tile_loadd(T, b, 64);                                                                                  \
        _tile_dpbf16ps(C, 0, T);                                                                                \
    }

/* mr (<= 16) rows x nr (<= 4) panels of y, as tile_kernel; the caller has configured the tiles for mr rows, or for
 * 16 with x zero-padded (the C rows past mr are not read). dec:
 * NULL, or the panel block's decoded B tiles [nr][K / 32][16 pair steps] (fill: decode them now, else reuse) */
static void amx_tile(const bf16 *x, int64_t xs, const float *xsum, int mr, const QWeight *w, int64_t p, int nr,
                     int pfn, vp *dec, int fill, const bf16 *bias, bf16 *y, int64_t ys, int lanes) {
    const int64_t K = w->K, G = w->G, panel_bytes = K * 8;
    const uint8_t *codes = w->codes + p * panel_bytes;
    vp buf[2][16] __attribute__((aligned(64))); /* B tiles being decoded: [pair step][16 outputs x 2 inputs] */
    float cbuf[AMX_MR][LANES] __attribute__((aligned(64)));
    vf acc[AMX_MR][AMX_NR];
    for (int a = 0; a < mr; a++)
        for (int j = 0; j < nr; j++) acc[a][j] = (vf){0};
    for (int64_t g = 0; g < G; g++) {
        _tile_zero(3);
        if (nr > 1) _tile_zero(4);
        if (nr > 2) _tile_zero(5);
        if (nr > 3) _tile_zero(6);
        for (int64_t k0 = g * w->group; k0 < (g + 1) * w->group; k0 += 32) {
            _tile_loadd(0, x + k0, xs * 2);
            AMX_PANEL(0, 1, 3) AMX_PANEL(1, 2, 4) AMX_PANEL(2, 1, 5) AMX_PANEL(3, 2, 6)
        }
        for (int j = 0; j < nr; j++) {
            switch (j) { /* tile numbers are immediates */
            case 0: _tile_stored(3, cbuf, 64); break;
            case 1: _tile_stored(4, cbuf, 64); break;
            case 2: _tile_stored(5, cbuf, 64); break;
            default: _tile_stored(6, cbuf, 64); break;
            }
            const int64_t at = ((p + j) * G + g) * 16;
            const vf s = h8_load16(w->scales + at);
            vf m = {0};
            if (w->offset_kind) m = h8_load16(w->offsets + at);
            if (w->offset_kind == 2) m = -(m * s);
            m -= 128 * s; /* the codes were read as 128 + q */
            for (int a = 0; a < mr; a++) {
                vf c;
                memcpy(&c, cbuf[a], sizeof(c));
                acc[a][j] += c * s + m * xsum[a * G + g];
            }
        }
    }
    for (int j = 0; j < nr; j++) {
        const int n = j == nr - 1 ? lanes : LANES;
        const vf b = bias ? bf16_load16(bias + LANES * j, n) : (vf){0};
        for (int a = 0; a < mr; a++) bf16_store16(y + a * ys + LANES * j, acc[a][j] + b, n);
    }
}

/* Panels p0..p1 of y in blocks of AMX_NR panels x AMX_MR rows (as avx_panels; the tiles configured per row count) */
static void amx_panels(const bf16 *x, int64_t xs, const float *xsum, const QWeight *w, int64_t M, int64_t N,
                       int64_t p0, int64_t p1, const bf16 *bias, bf16 *y, int64_t ys) {
    if (p0 >= p1) return;
    const int64_t K = w->K, tail = M > AMX_MR ? M % AMX_MR : 0;
    /* More than one row block: the tiles stay configured for 16 rows, a last partial block reading its rows from
     * xpad, zero-padded to 16 (where that allocation fails, the tiles are configured per block); each panel block is
     * decoded once, by its first row block, into dec for the others (1 KiB per 32 inputs per panel; about a tenth
     * off at 17-32 rows), where dec stays in L2 (DEC_MAX); past that, or where it cannot be allocated, every row block
     * decodes again (reading 4x the bytes back from beyond L2 cost more than the decode: 1.3-1.8x at K = 11008). */
    vp *dec = M > AMX_MR && AMX_NR * K * 32 <= DEC_MAX ? aligned_alloc(64, (size_t)(AMX_NR * K * 32)) : NULL;
    bf16 *xpad = tail ? aligned_alloc(64, (size_t)(AMX_MR * K * 2)) : NULL;
    if (xpad) {
        memset(xpad, 0, (size_t)(AMX_MR * K * 2));
        for (int64_t a = 0; a < tail; a++) memcpy(xpad + a * K, x + (M - tail + a) * xs, (size_t)(K * 2));
    }
    int configured = 0; /* rows the tiles are configured for */
    for (int64_t p = p0; p < p1; p += AMX_NR) {
        const int nr = (int)(p1 - p < AMX_NR ? p1 - p : AMX_NR);
        const int64_t ahead = p1 - (p + nr);
        const int pfn = (int)(ahead < nr ? ahead : nr);
        const int64_t n0 = LANES * p;
        const int last = N - n0 - LANES * (nr - 1) < LANES ? (int)(N - n0 - LANES * (nr - 1)) : LANES;
        for (int64_t r = 0; r < M; r += AMX_MR) {
            const int mr = (int)(M - r < AMX_MR ? M - r : AMX_MR);
            const int padded = mr < AMX_MR && xpad != NULL, rows = padded ? AMX_MR : mr;
            if (rows != configured) amx_configure(rows), configured = rows;
            amx_tile(padded ? xpad : x + r * xs, padded ? K : xs, xsum + r * w->G, mr, w, p, nr, r == 0 ? pfn : 0,
                     dec, r == 0, bias ? bias + n0 : 0, y + r * ys + n0, ys, last);
        }
    }
    if (configured) _tile_release();
    free(dec);
    free(xpad);
}
#define AMX_BUILT 1
#else
int gemm_q_amx_init(void) { return 0; }
#endif

static int64_t amx_calls = 0; /* gemm_q calls that ran on tiles, for tests (atomic: callers may be threads) */
int64_t gemm_q_amx_calls(void) { return __atomic_load_n(&amx_calls, __ATOMIC_RELAXED); }

#if !(defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__))
#define AMX_BUILT 0
#define AMX_MIN_ROWS 1
#endif
