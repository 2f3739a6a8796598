/* kvq fused CPU kernels: the shared encode/decode path of kvq/quant/base.py for the uniform,
 * normal and adaptive methods (kvq/quant/methods.py), one pass per block of rows, bit for bit
 * equal to the eager reference (codes, fp16 metadata and decoded values).
 *
 * Built once per machine by kvq/quant/fused.py (cc -O3 -march=native -ffp-contract=off, no
 * fast-math: every float operation is the one the reference performs, in the same order, and
 * is correctly rounded) and called through ctypes on blocks of rows; the caller splits large
 * blocks over threads. Plain C everywhere, with AVX-512 paths where the compiler targets it
 * (register-resident groups for uniform and normal; for adaptive, 16 groups side by side in the
 * vector lanes: a bitonic sort of their keys, double-precision prefix sums, the searches of the
 * codebook fit). Conventions:
 *
 *   x      [n, D] units (float32, float16 or bfloat16: dtype codes F32 / F16 / BF16)
 *   keep   uint8 [n, D] (1 = counts for the statistics; outliers are 0) or NULL
 *   groups of g features per unit (the last group may be smaller), G = ceil(D / g)
 *   meta   fp16 bit patterns [n, G] (one field) or [n, G, L] (adaptive codebook)
 *   packed the codes of the block as an LSB-first bit stream, bits per code, zero-padded to
 *          whole bytes of 8 codes (kvq/quant/packing.py); a call on rows [r0, r1) writes the
 *          bytes of those rows, so r0 * D must be a multiple of 8
 *
 * Encoders return 0, or 1 when a value is not finite or so large that the reference's float
 * arithmetic overflows: the caller then runs the eager reference instead.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h> /* the vector paths below are compiled only where -march enables them */
#endif

enum { F32 = 0, F16 = 1, BF16 = 2 };
enum { UNIFORM = 0, NORMAL = 1, ADAPTIVE = 2 };
#define LANES 16     /* groups processed side by side by the adaptive kernel */
#define SUB_ROWS 64  /* rows per sub-block (multiple of 8 and of LANES) */
static const float TINY = 5.9604644775390625e-08f; /* 2**-24, the smallest fp16 */
static const float BIG = 1e30f;                    /* beyond: the eager reference */

int kvq_version(void) { return 1; }

/* ---------------------------------------------------------------- fp16 / bf16 conversions */
static inline float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else /* exact conversion (FP16 library, fp16_ieee_to_fp32_value) */
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float exp_scale = bits_f(0x7800000u);
    const float normalized = bits_f((two_w >> 4) + (0xE0u << 23)) * exp_scale;
    const float denormalized = bits_f((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = sign | (two_w < (1u << 27) ? f_bits(denormalized) : f_bits(normalized));
    return bits_f(r);
#endif
}

static inline uint16_t f2h(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else /* round to nearest even (FP16 library, fp16_ieee_from_fp32_value) */
    float base = (fabsf(f) * bits_f(0x77800000u)) * bits_f(0x08800000u);
    const uint32_t w = f_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = bits_f((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = f_bits(base);
    const uint32_t exp_bits = (b >> 13) & 0x00007C00u, mantissa_bits = b & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}


/* torch.nextafter on fp16 towards -inf / +inf, after rounding to nearest (base.py helpers) */
static inline uint16_t fp16_round_down(float x) {
    uint16_t h = f2h(x);
    if (h2f(h) > x) h = (h & 0x7FFF) == 0 ? 0x8001 : ((h & 0x8000) ? h + 1 : h - 1);
    return h;
}
static inline uint16_t fp16_round_up(float x) {
    uint16_t h = f2h(x);
    if (h2f(h) < x) h = (h & 0x7FFF) == 0 ? 0x0001 : ((h & 0x8000) ? h - 1 : h + 1);
    return h;
}
static inline uint16_t clamp_tiny(uint16_t h) { return h2f(h) < TINY ? 0x0001 : h; }

static void load_row(const void* x, int dt, int64_t off, int64_t n, float* dst) {
    int64_t i = 0;
    if (dt == F32) {
        memcpy(dst, (const float*)x + off, (size_t)n * 4);
    } else if (dt == F16) {
        const uint16_t* s = (const uint16_t*)x + off;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i))));
#elif defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
#endif
        for (; i < n; i++) dst[i] = h2f(s[i]);
    } else {
        const uint16_t* s = (const uint16_t*)x + off;
        uint32_t* d = (uint32_t*)dst;
        for (; i < n; i++) d[i] = (uint32_t)s[i] << 16;
    }
}

static void store_row(const float* src, int64_t n, void* out, int dt, int64_t off) {
    int64_t i = 0;
    if (dt == F32) {
        memcpy((float*)out + off, src, (size_t)n * 4);
    } else if (dt == F16) {
        uint16_t* d = (uint16_t*)out + off;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm256_storeu_si256((__m256i*)(d + i),
                                _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(d + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
        for (; i < n; i++) d[i] = f2h(src[i]);
    } else {
        uint16_t* d = (uint16_t*)out + off;
        const uint32_t* s = (const uint32_t*)src;
        for (; i < n; i++) {
            const uint32_t u = s[i];
            d[i] = (src[i] != src[i]) ? 0x7FC0 : (uint16_t)((u + ((u >> 16) & 1u) + 0x7FFFu) >> 16);
        }
    }
}

/* ---------------------------------------------------------------- bit packing */
/* n codes -> ceil(n / 8) * bits bytes (LSB-first bit stream, zero-padded to 8 codes) */
static void pack(const uint8_t* c, int64_t n, int bits, uint8_t* out) {
    const int64_t full = n / 8, rem = n % 8;
    int64_t b;
    if (bits == 8) {
        memcpy(out, c, (size_t)(full * 8));
    } else if (bits == 4) {
        for (int64_t i = 0; i < full * 4; i++) out[i] = (uint8_t)(c[2 * i] | (c[2 * i + 1] << 4));
    } else if (bits == 2) {
        for (int64_t i = 0; i < full * 2; i++)
            out[i] = (uint8_t)(c[4 * i] | (c[4 * i + 1] << 2) | (c[4 * i + 2] << 4) | (c[4 * i + 3] << 6));
    } else {
        for (b = 0; b < full; b++) {
            uint64_t v = 0;
            for (int j = 0; j < 8; j++) v |= (uint64_t)c[8 * b + j] << (j * bits);
            for (int j = 0; j < bits; j++) out[b * bits + j] = (uint8_t)(v >> (8 * j));
        }
    }
    if (rem) {
        uint64_t v = 0;
        for (int j = 0; j < rem; j++) v |= (uint64_t)c[8 * full + j] << (j * bits);
        for (int j = 0; j < bits; j++) out[full * bits + j] = (uint8_t)(v >> (8 * j));
    }
}

/* the n codes that start at a whole block of packed (inverse of pack) */
static void unpack(const uint8_t* p, int64_t n, int bits, uint8_t* c) {
    const int64_t full = n / 8, rem = n % 8;
    const uint8_t mask = (uint8_t)((1u << bits) - 1u);
    if (bits == 8) {
        memcpy(c, p, (size_t)(full * 8));
    } else if (bits == 4) {
        for (int64_t i = 0; i < full * 4; i++) {
            c[2 * i] = p[i] & 15;
            c[2 * i + 1] = p[i] >> 4;
        }
    } else if (bits == 2) {
        for (int64_t i = 0; i < full * 2; i++) {
            c[4 * i] = p[i] & 3;
            c[4 * i + 1] = (p[i] >> 2) & 3;
            c[4 * i + 2] = (p[i] >> 4) & 3;
            c[4 * i + 3] = p[i] >> 6;
        }
    } else {
        for (int64_t b = 0; b < full; b++) {
            uint64_t v = 0;
            for (int j = 0; j < bits; j++) v |= (uint64_t)p[b * bits + j] << (8 * j);
            for (int j = 0; j < 8; j++) c[8 * b + j] = (uint8_t)(v >> (j * bits)) & mask;
        }
    }
    if (rem) {
        uint64_t v = 0;
        for (int j = 0; j < bits; j++) v |= (uint64_t)p[full * bits + j] << (8 * j);
        for (int j = 0; j < rem; j++) c[8 * full + j] = (uint8_t)(v >> (j * bits)) & mask;
    }
}

/* ---------------------------------------------------------------- shared helpers */
static inline int64_t next_pow2(int64_t n) {
    int64_t p = 1;
    while (p < n) p <<= 1;
    return p;
}

/* the reference's tree_sum: halves added pairwise, t[i] + t[i + h], on a power-of-two buffer
 * (destroys t) */
#if defined(__AVX__)
static inline float tail8(__m256 v) { /* the last 8 of a tree: the same pairs, in registers */
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
#endif
#if defined(__AVX512F__)
static inline __attribute__((always_inline)) float tree_regs(const float* t, const int n) {
    __m512 r[16]; /* n vectors of 16, n a power of two <= 16: kept in registers */
    for (int i = 0; i < n; i++) r[i] = _mm512_loadu_ps(t + 16 * i);
    for (int h = n >> 1; h >= 1; h >>= 1)
        for (int i = 0; i < h; i++) r[i] = _mm512_add_ps(r[i], r[i + h]);
    const __m256 lo = _mm512_castps512_ps256(r[0]);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r[0]), 1));
    return tail8(_mm256_add_ps(lo, hi));
}
#endif
static inline float tree_sum(float* t, int64_t P) {
#if defined(__AVX512F__)
    switch (P) {
        case 16: return tree_regs(t, 1);
        case 32: return tree_regs(t, 2);
        case 64: return tree_regs(t, 4);
        case 128: return tree_regs(t, 8);
        case 256: return tree_regs(t, 16);
        default: break;
    }
#endif
    int64_t h = P >> 1;
#if defined(__AVX__)
    for (; h >= 8; h >>= 1)
        for (int64_t i = 0; i < h; i += 8)
            _mm256_storeu_ps(t + i, _mm256_add_ps(_mm256_loadu_ps(t + i), _mm256_loadu_ps(t + i + h)));
    if (P >= 8) return tail8(_mm256_loadu_ps(t));
#endif
    for (; h >= 1; h >>= 1)
        for (int64_t i = 0; i < h; i++) t[i] = t[i] + t[i + h];
    return t[0];
}

/* out[i] = tab[c[i]] for a table of L floats (at least 32 readable) */
static void lookup(const float* tab, int L, const uint8_t* c, int64_t n, float* out) {
    (void)L;
    int64_t i = 0;
#if defined(__AVX512F__)
    if (L <= 32) {
        const __m512 lo = _mm512_loadu_ps(tab), hi = _mm512_loadu_ps(tab + 16);
        for (; i + 16 <= n; i += 16) {
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + i)));
            _mm512_storeu_ps(out + i, _mm512_permutex2var_ps(lo, idx, hi));
        }
    } else {
        for (; i + 16 <= n; i += 16) {
            const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(c + i)));
            _mm512_storeu_ps(out + i, _mm512_i32gather_ps(idx, tab, 4));
        }
    }
#endif
    for (; i < n; i++) out[i] = tab[c[i]];
}

/* min and max of the valid entries, and whether any entry is not finite or beyond BIG */
static inline int stats(const float* v, const uint8_t* k, int64_t n, float* mn_out, float* mx_out) {
    float mn = INFINITY, mx = -INFINITY, amax = 0.f;
    if (k) {
        for (int64_t i = 0; i < n; i++) {
            const float a = v[i];
            amax = fmaxf(amax, fabsf(a));
            if (k[i]) {
                mn = a < mn ? a : mn;
                mx = a > mx ? a : mx;
            }
        }
    } else {
#pragma omp simd reduction(min : mn) reduction(max : mx, amax)
        for (int64_t i = 0; i < n; i++) {
            const float a = v[i];
            mn = a < mn ? a : mn;
            mx = a > mx ? a : mx;
            amax = fabsf(a) > amax ? fabsf(a) : amax;
        }
    }
    *mn_out = mn;
    *mx_out = mx;
    return !(amax <= BIG); /* also true for NaN */
}

typedef struct {
    int64_t D, g, G;
    int bits;
} layout;

/* ---------------------------------------------------------------- uniform */
/* the stored fp16 zero/scale of a group from its min and max, and the offset and step they give */
static inline void uniform_meta(float mn, float mx, int bits, int sym, uint16_t* m0, uint16_t* m1, float* off_out,
                                float* s_out) {
    const int L = (1 << bits) - 1;
    float off, s;
    if (mn > mx) mn = mx = 0.f; /* no valid entry */
    if (sym) {
        const float a = fmaxf(fabsf(mx), fabsf(mn));
        const uint16_t sh = clamp_tiny(fp16_round_up(2.f * a / (float)L));
        *m0 = sh;
        s = h2f(sh);
        off = (-(float)L / 2.f) * s;
    } else {
        const uint16_t zh = fp16_round_down(mn);
        off = h2f(zh);
        const uint16_t sh = clamp_tiny(fp16_round_up((mx - off) / (float)L));
        *m0 = zh;
        *m1 = sh;
        s = h2f(sh);
    }
    *off_out = off;
    *s_out = s;
}

static int uniform_group(const float* v, const uint8_t* k, int64_t gs, int bits, int sym, uint16_t* m0,
                         uint16_t* m1, uint8_t* codes) {
    const int L = (1 << bits) - 1;
    float mn, mx, off, s;
    if (stats(v, k, gs, &mn, &mx)) return 1;
    uniform_meta(mn, mx, bits, sym, m0, m1, &off, &s);
    const float Lf = (float)L;
    for (int64_t i = 0; i < gs; i++) {
        float c = rintf((v[i] - off) / s);
        c = c < 0.f ? 0.f : (c > Lf ? Lf : c);
        codes[i] = (uint8_t)c;
    }
    return 0;
}

#if defined(__AVX512F__)
static inline __mmask16 lane_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u));
}

/* codes[i] = number of table entries below z[i], the table (<= 31 ascending entries, +inf after)
 * in two registers; n a multiple of 16 or the tail masked */
static void search_regs(__m512 lo, __m512 hi, int32_t top, const float* z, int64_t n, uint8_t* codes) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        const __m512 zz = _mm512_maskz_loadu_ps(m, z + i);
        __m512i p = _mm512_setzero_si512();
        for (int32_t s = top; s >= 1; s >>= 1) {
            const __m512 t = _mm512_permutex2var_ps(lo, _mm512_add_epi32(p, _mm512_set1_epi32(s - 1)), hi);
            p = _mm512_mask_add_epi32(p, _mm512_cmp_ps_mask(t, zz, _CMP_LT_OQ), p, _mm512_set1_epi32(s));
        }
        _mm_mask_storeu_epi8(codes + i, m, _mm512_cvtepi32_epi8(p));
    }
}
#endif

/* codes[i] = number of the ascending tab[0 .. 2 top - 2] below z[i] (branch-free binary search) */
static void search_table(const float* tab, int32_t top, const float* z, int64_t n, uint8_t* codes) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if (top <= 16) { /* the table in one or two registers, padded with +inf */
        float pad[32];
        for (int k = 0; k < 32; k++) pad[k] = k < 2 * top - 1 ? tab[k] : INFINITY;
        const __m512 lo = _mm512_loadu_ps(pad), hi = _mm512_loadu_ps(pad + 16);
        search_regs(lo, hi, top, z, n, codes);
        return;
    } else {
        for (; i + 16 <= n; i += 16) {
            const __m512 zz = _mm512_loadu_ps(z + i);
            __m512i p = _mm512_setzero_si512();
            for (int32_t s = top; s >= 1; s >>= 1) {
                const __m512 t = _mm512_i32gather_ps(_mm512_add_epi32(p, _mm512_set1_epi32(s - 1)), tab, 4);
                p = _mm512_mask_add_epi32(p, _mm512_cmp_ps_mask(t, zz, _CMP_LT_OQ), p, _mm512_set1_epi32(s));
            }
            _mm_storeu_si128((__m128i*)(codes + i), _mm512_cvtepi32_epi8(p));
        }
    }
#endif
    for (; i < n; i++) {
        int32_t c = 0;
        for (int32_t s = top; s >= 1; s >>= 1)
            if (tab[c + s - 1] < z[i]) c += s;
        codes[i] = (uint8_t)c;
    }
}

/* ---------------------------------------------------------------- normal */
static int normal_group(const float* v, const uint8_t* k, int64_t gs, int64_t g, int bits, const float* bnd,
                        uint16_t* m0, uint16_t* m1, uint8_t* codes, float* t) {
    const int L = 1 << bits;
    const int64_t P = next_pow2(g);
    int64_t cnt_i = 0;
    if (k) {
        float mn, mx;
        if (stats(v, k, gs, &mn, &mx)) return 1;
        for (int64_t i = 0; i < gs; i++) {
            const float w = k[i] ? 1.f : 0.f;
            cnt_i += k[i] != 0;
            t[i] = v[i] * w;
        }
    } else { /* every weight is 1: v * 1 == v and (v - mean) * 1 == v - mean, exactly */
        float amax = 0.f;
#pragma omp simd reduction(max : amax)
        for (int64_t i = 0; i < gs; i++) {
            t[i] = v[i];
            amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
        }
        if (!(amax <= BIG)) return 1;
        cnt_i = gs;
    }
    for (int64_t i = gs; i < P; i++) t[i] = 0.f; /* zero padding (0 * weight 0) */
    float cnt = (float)cnt_i;
    cnt = cnt < 1.f ? 1.f : cnt;
    const float mean = tree_sum(t, P) / cnt;
    if (k) {
        for (int64_t i = 0; i < gs; i++) {
            const float d = (v[i] - mean) * (k[i] ? 1.f : 0.f);
            t[i] = d * d;
        }
    } else {
        for (int64_t i = 0; i < gs; i++) {
            const float d = v[i] - mean;
            t[i] = d * d;
        }
    }
    for (int64_t i = gs; i < g; i++) {
        const float d = (0.f - mean) * 0.f;
        t[i] = d * d;
    }
    for (int64_t i = g; i < P; i++) t[i] = 0.f;
    const float var = tree_sum(t, P) / cnt;
    const uint16_t mh = f2h(mean), sh = clamp_tiny(f2h(sqrtf(var)));
    *m0 = mh;
    *m1 = sh;
    const float mf = h2f(mh), sf = h2f(sh);
    for (int64_t i = 0; i < gs; i++) t[i] = (v[i] - mf) / sf;
    search_table(bnd, L >> 1, t, gs, codes);
    return 0;
}

/* ---------------------------------------------------------------- adaptive */
/* A float's bits as an int32 key in the same order (the reference's _sort_groups). */
static inline int32_t mono(float f) {
    int32_t k = (int32_t)f_bits(f);
    return k ^ ((k >> 31) & 0x7FFFFFFF);
}
static inline float unmono(int32_t k) { return bits_f((uint32_t)(k ^ ((k >> 31) & 0x7FFFFFFF))); }

/* The compare-exchange pairs of Batcher's odd-even merge sort of P (a power of two) keys, as
 * (i, j) pairs into pairs[]; returns their number. */
static int64_t sort_pairs(int64_t P, int32_t* pairs) {
    int64_t n = 0;
    int sh = 1; /* log2(2 p) */
    for (int64_t p = 1; p < P; p <<= 1, sh++)
        for (int64_t k = p; k >= 1; k >>= 1)
            for (int64_t j = k & (p - 1); j + k < P; j += 2 * k)
                for (int64_t i = 0; i < k && i + j + k < P; i++)
                    if (((i + j) >> sh) == ((i + j + k) >> sh)) {
                        if (pairs) {
                            pairs[2 * n] = (int32_t)(i + j);
                            pairs[2 * n + 1] = (int32_t)(i + j + k);
                        }
                        n++;
                    }
    return n;
}

/* sort the keys of each of LANES lanes with a pair list of sort_pairs */
static void sort_lanes(int32_t (*key)[LANES], const int32_t* pairs, int64_t n_pairs) {
    for (int64_t q = 0; q < n_pairs; q++) {
        int32_t* a = key[pairs[2 * q]];
        int32_t* b = key[pairs[2 * q + 1]];
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            const int32_t lo = a[l] < b[l] ? a[l] : b[l], hi = a[l] < b[l] ? b[l] : a[l];
            a[l] = lo;
            b[l] = hi;
        }
    }
}

#if defined(__AVX512F__)
/* Bitonic sort of P >= 16 rows of LANES keys (each lane sorted on its own), run in blocks of 16
 * rows held in registers: every layer whose pairs stay inside a block runs there, only the
 * layers of distance >= 16 go through memory. The sorted keys are what any sort gives. */
#define CE_UP(a, b, up)                                                               \
    do {                                                                              \
        const __m512i lo_ = _mm512_min_epi32(a, b), hi_ = _mm512_max_epi32(a, b);   \
        (a) = (up) ? lo_ : hi_;                                                       \
        (b) = (up) ? hi_ : lo_;                                                       \
    } while (0)

static inline __attribute__((always_inline)) void block_layers(__m512i* r, int stage, int jtop, int up_block) {
    /* layers j = jtop .. 1 of a stage: direction by (i & stage) inside the block (stage < 16) or
     * up_block for the whole block */
#pragma GCC unroll 4
    for (int j = jtop; j >= 1; j >>= 1) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            const int l = i ^ j;
            if (l > i) {
                const int up = stage < 16 ? (i & stage) == 0 : up_block;
                CE_UP(r[i], r[l], up);
            }
        }
    }
}

static void bitonic_lanes(int32_t (*key)[LANES], int64_t P) {
    for (int64_t b = 0; b < P; b += 16) { /* stages 2 .. 16 inside each block */
        __m512i r[16];
        for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(key[b + i]);
        block_layers(r, 2, 1, 1);
        block_layers(r, 4, 2, 1);
        block_layers(r, 8, 4, 1);
        block_layers(r, 16, 8, (b & 16) == 0);
        for (int i = 0; i < 16; i++) _mm512_storeu_si512(key[b + i], r[i]);
    }
    for (int64_t k = 32; k <= P; k <<= 1) {
        for (int64_t j = k >> 1; j >= 16; j >>= 1) /* distances >= 16: through memory */
            for (int64_t i = 0; i < P; i++)
                if (!(i & j)) {
                    __m512i a = _mm512_loadu_si512(key[i]), c = _mm512_loadu_si512(key[i + j]);
                    CE_UP(a, c, !(i & k));
                    _mm512_storeu_si512(key[i], a);
                    _mm512_storeu_si512(key[i + j], c);
                }
        for (int64_t b = 0; b < P; b += 16) { /* distances 8 .. 1 inside each block */
            __m512i r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(key[b + i]);
            block_layers(r, 32, 8, !(b & k));
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(key[b + i], r[i]);
        }
    }
}
#endif

typedef struct {
    int64_t P;           /* sort size (power of two >= group size) */
    int L;               /* levels */
    float (*srt)[LANES]; /* [P] sorted values (+inf for invalid and padding) */
    float (*p1)[LANES];  /* [P + 1] float(double prefix sums) */
    int32_t nv[LANES];   /* valid entries */
} sorted_lanes;

/* run ends of nearest-level coding of levels lv [L]: per midpoint, the count of srt <= it
 * ([L - 1]); the L - 1 binary searches advance together (independent gathers) */
static void runs(const sorted_lanes* S, float (*lv)[LANES], int32_t (*ends)[LANES]) {
    const int M = S->L - 1;
    const float* srt = &S->srt[0][0];
    float mid[256][LANES];
    for (int k = 0; k < M; k++)
        for (int l = 0; l < LANES; l++) {
            mid[k][l] = (lv[k + 1][l] + lv[k][l]) * 0.5f;
            ends[k][l] = 0;
        }
#if defined(__AVX512F__)
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int32_t top = (int32_t)(S->P >> 1);
    if (S->P >= 64 && S->P <= 256) { /* first the block of 16 rows: count the block ends <= mid (no gathers) */
        const int nb = (int)(S->P / 16) - 1;
        __m512 be[15];
        for (int b = 0; b < nb; b++) be[b] = _mm512_loadu_ps(S->srt[16 * b + 15]);
        for (int k = 0; k < M; k++) {
            const __m512 m = _mm512_loadu_ps(mid[k]);
            __m512i p = _mm512_setzero_si512();
            for (int b = 0; b < nb; b++)
                p = _mm512_mask_add_epi32(p, _mm512_cmp_ps_mask(be[b], m, _CMP_LE_OQ), p, _mm512_set1_epi32(16));
            _mm512_storeu_si512(ends[k], p);
        }
        top = 8;
    }
    for (int32_t s = top; s >= 1; s >>= 1)
        for (int k = 0; k < M; k++) {
            __m512i p = _mm512_loadu_si512(ends[k]);
            const __m512i at = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(p, _mm512_set1_epi32(s - 1)), 4), lane);
            const __mmask16 m = _mm512_cmp_ps_mask(_mm512_i32gather_ps(at, srt, 4), _mm512_loadu_ps(mid[k]), _CMP_LE_OQ);
            _mm512_storeu_si512(ends[k], _mm512_mask_add_epi32(p, m, p, _mm512_set1_epi32(s)));
        }
#else
    for (int32_t s = (int32_t)(S->P >> 1); s >= 1; s >>= 1)
        for (int k = 0; k < M; k++)
            for (int l = 0; l < LANES; l++)
                if (srt[(ends[k][l] + s - 1) * LANES + l] <= mid[k][l]) ends[k][l] += s;
#endif
    for (int k = 0; k < M; k++)
        for (int l = 0; l < LANES; l++) ends[k][l] += srt[ends[k][l] * LANES + l] <= mid[k][l] ? 1 : 0;
}

/* sums and counts of the runs cut at ends [L - 1] (edges 0 and nv around them), [L] each */
static void bins(const sorted_lanes* S, int32_t (*ends)[LANES], float (*s1)[LANES], float (*c)[LANES]) {
#if defined(__AVX512F__)
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float* p1 = &S->p1[0][0];
    __m512i e0 = _mm512_setzero_si512();
    __m512 v0 = _mm512_setzero_ps(); /* p1[0] = 0 */
    for (int k = 0; k < S->L; k++) {
        const __m512i e1 = k + 1 < S->L ? _mm512_loadu_si512(ends[k]) : _mm512_loadu_si512(S->nv);
        const __m512 v1 = _mm512_i32gather_ps(_mm512_add_epi32(_mm512_slli_epi32(e1, 4), lane), p1, 4);
        _mm512_storeu_ps(s1[k], _mm512_sub_ps(v1, v0));
        _mm512_storeu_ps(c[k], _mm512_cvtepi32_ps(_mm512_sub_epi32(e1, e0)));
        e0 = e1;
        v0 = v1;
    }
    return;
#endif
    for (int k = 0; k < S->L; k++)
        for (int l = 0; l < LANES; l++) {
            const int32_t e0 = k ? ends[k - 1][l] : 0, e1 = k + 1 < S->L ? ends[k][l] : S->nv[l];
            s1[k][l] = S->p1[e1][l] - S->p1[e0][l];
            c[k][l] = (float)(e1 - e0);
        }
}

/* forward-fill empty bins in place (the reference's _fill_empty: each bin takes the level of the
 * last non-empty bin at or below it, bin 0 its own) */
static void fill_empty(int L, float (*lv)[LANES], float (*c)[LANES]) {
    for (int k = 1; k < L; k++)
        for (int l = 0; l < LANES; l++) lv[k][l] = c[k][l] > 0.f ? lv[k][l] : lv[k - 1][l];
}

/* bin means where a bin has values, else keep (the reference's where(c > 0, s1 / c.clamp_min(1), keep)) */
static void means(int L, float (*out)[LANES], float (*s1)[LANES], float (*c)[LANES], float (*keep)[LANES]) {
    for (int k = 0; k < L; k++)
        for (int l = 0; l < LANES; l++) {
            const float m = s1[k][l] / (c[k][l] < 1.f ? 1.f : c[k][l]);
            out[k][l] = c[k][l] > 0.f ? m : (keep ? keep[k][l] : 0.f);
        }
}

/* the candidate's squared error up to the group's constant, tree-summed over levels: [LANES] */
static void excess(int L, float (*cand)[LANES], float (*s1)[LANES], float (*c)[LANES], float (*t)[LANES]) {
    for (int k = 0; k < L; k++)
        for (int l = 0; l < LANES; l++) t[k][l] = cand[k][l] * (c[k][l] * cand[k][l] - 2.f * s1[k][l]);
    for (int h = L >> 1; h >= 1; h >>= 1)
        for (int k = 0; k < h; k++)
            for (int l = 0; l < LANES; l++) t[k][l] = t[k][l] + t[k + h][l];
}

typedef struct adaptive_scratch {
    float* vals;     /* [LANES][P] the lanes' values, row-major */
    int32_t* keys_rm; /* [LANES][P] their sort keys, row-major */
    int32_t (*key)[LANES];
    float (*w)[LANES];
    const int32_t* pairs[2]; /* sort pairs for the full group and the last (smaller) group */
    int64_t n_pairs[2];
    sorted_lanes S;
} adaptive_scratch;

/* one batch of up to LANES rows [r, r + nl), group gi */
static int adaptive_batch(const void* x, int xdt, const uint8_t* keep, int64_t r, int nl, int64_t gi,
                          layout lay, int iters, const float* lin, uint16_t* cb, uint8_t* codes, int64_t rs,
                          adaptive_scratch* A) {
    const int L = 1 << lay.bits;
    const int64_t o = gi * lay.g, gs = lay.D - o < lay.g ? lay.D - o : lay.g, P = next_pow2(gs);
    const int last = gs < lay.g;
    sorted_lanes* S = &A->S;
    int32_t (*key)[LANES] = A->key;
    S->P = P;
    S->L = L;
    float (*w)[LANES] = A->w;
    float (*q)[LANES] = w, (*grid)[LANES] = w + L, (*lv)[LANES] = w + 2 * L, (*s1)[LANES] = w + 3 * L;
    float (*cq)[LANES] = w + 4 * L, (*sg)[LANES] = w + 5 * L, (*cg)[LANES] = w + 6 * L;
    float (*cc)[LANES] = w + 7 * L;
    int32_t ends[256][LANES];
    float tq[256][LANES], tg[256][LANES];
    for (int l = 0; l < LANES; l++) {
        const int64_t rr = r + (l < nl ? l : nl - 1);
        float* row = A->vals + l * P;
        load_row(x, xdt, rr * lay.D + o, gs, row);
        const uint8_t* k = keep ? keep + rr * lay.D + o : NULL;
        int32_t nv = 0;
        const int32_t kinf = mono(INFINITY);
        int32_t* kr = A->keys_rm + l * P; /* keys row-major, then transposed */
        float amax = 0.f;
        if (k) {
            for (int64_t i = 0; i < gs; i++) {
                kr[i] = k[i] ? mono(row[i]) : kinf;
                nv += k[i] != 0;
                amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
            }
        } else {
#pragma omp simd reduction(max : amax)
            for (int64_t i = 0; i < gs; i++) {
                kr[i] = mono(row[i]);
                amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
            }
            nv = (int32_t)gs;
        }
        if (!(amax <= BIG)) return 1;
        for (int64_t i = gs; i < P; i++) kr[i] = kinf;
        S->nv[l] = nv;
    }
    for (int64_t i = 0; i < P; i++)
        for (int l = 0; l < LANES; l++) key[i][l] = A->keys_rm[l * P + i];
#if defined(__AVX512F__)
    if (P >= 16)
        bitonic_lanes(key, P);
    else
#endif
        sort_lanes(key, A->pairs[last], A->n_pairs[last]);
    /* sorted values and their prefix sums, accumulated in double as torch's CPU cumsum does */
#if defined(__AVX512F__)
    {
        __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
        const __m512i m31 = _mm512_set1_epi32(0x7FFFFFFF);
        _mm512_storeu_ps(S->p1[0], _mm512_setzero_ps());
        for (int64_t i = 0; i < P; i++) {
            const __m512i k = _mm512_loadu_si512(key[i]);
            const __m512 v = _mm512_castsi512_ps(_mm512_xor_si512(k, _mm512_and_si512(_mm512_srai_epi32(k, 31), m31)));
            _mm512_storeu_ps(S->srt[i], v);
            a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
            a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
            const __m256 lo = _mm512_cvtpd_ps(a0), hi = _mm512_cvtpd_ps(a1);
            _mm512_storeu_ps(S->p1[i + 1], _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                                                                   _mm256_castps_pd(hi), 1)));
        }
    }
#else
    double acc[LANES];
    for (int l = 0; l < LANES; l++) {
        acc[l] = 0.0;
        S->p1[0][l] = 0.f;
    }
    for (int64_t i = 0; i < P; i++)
        for (int l = 0; l < LANES; l++) {
            const float v = unmono(key[i][l]);
            S->srt[i][l] = v;
            acc[l] += (double)v;
            S->p1[i + 1][l] = (float)acc[l];
        }
#endif
    /* 1. the quantile codebook: rank k goes to bin floor(k L / n) */
    for (int k = 0; k + 1 < L; k++)
        for (int l = 0; l < LANES; l++) ends[k][l] = ((k + 1) * S->nv[l] + L - 1) >> lay.bits;
    bins(S, ends, s1, cq);
    means(L, q, s1, cq, NULL);
    fill_empty(L, q, cq);
    /* the min-max grid */
    for (int l = 0; l < LANES; l++) {
        const int has = S->nv[l] > 0;
        const float mn = has ? S->srt[0][l] : 0.f, mx = has ? S->srt[S->nv[l] - 1][l] : 0.f;
        for (int k = 0; k < L; k++) grid[k][l] = mn + (mx - mn) * lin[k];
    }
    /* the candidate with the lower squared error */
    runs(S, q, ends);
    bins(S, ends, s1, cq);
    runs(S, grid, ends);
    bins(S, ends, sg, cg);
    excess(L, q, s1, cq, tq);
    excess(L, grid, sg, cg, tg);
    for (int l = 0; l < LANES; l++) {
        const int pick = tq[0][l] <= tg[0][l];
        for (int k = 0; k < L; k++) {
            lv[k][l] = pick ? q[k][l] : grid[k][l];
            s1[k][l] = pick ? s1[k][l] : sg[k][l];
            cc[k][l] = pick ? cq[k][l] : cg[k][l];
        }
    }
    /* 2. Lloyd steps */
    for (int step = 0; step < iters; step++) {
        if (step) {
            runs(S, lv, ends);
            bins(S, ends, s1, cc);
        }
        means(L, lv, s1, cc, lv);
        fill_empty(L, lv, cc);
    }
    /* the fp16 codebook, and nearest-level codes: the number of its midpoints below the value
     * (invalid entries: L - 1, where the reference's sorted order puts them) */
    uint16_t (*hb)[LANES] = (uint16_t (*)[LANES])tq; /* the codebooks in fp16, [L][LANES] */
    for (int k = 0; k < L; k++) { /* fp16, and back: what the encoder's boundaries use */
#if defined(__AVX512F__)
        const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(lv[k]), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_si256((__m256i*)hb[k], h);
        _mm512_storeu_ps(lv[k], _mm512_cvtph_ps(h));
#else
        for (int l = 0; l < LANES; l++) {
            hb[k][l] = f2h(lv[k][l]);
            lv[k][l] = h2f(hb[k][l]);
        }
#endif
    }
    for (int k = 0; k + 1 < L; k++) /* midpoints, in place: lv[k] = (lv[k + 1] + lv[k]) / 2 */
        for (int l = 0; l < LANES; l++) lv[k][l] = (lv[k + 1][l] + lv[k][l]) * 0.5f;
    for (int l = 0; l < nl; l++) {
        uint16_t* book = cb + ((r + l) * lay.G + gi) * L;
        for (int k = 0; k < L; k++) book[k] = hb[k][l];
        uint8_t* c = codes + (r + l - rs) * lay.D + o;
#if defined(__AVX512F__)
        if (L <= 32) { /* this lane's midpoints, lv[k][l], into two registers */
            const __m512i at = _mm512_add_epi32(_mm512_slli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                                     11, 12, 13, 14, 15), 4),
                                                _mm512_set1_epi32(l));
            const __m512 inf = _mm512_set1_ps(INFINITY);
            const __mmask16 m0 = lane_mask(L - 1), m1 = lane_mask(L - 17);
            const __m512 lo = _mm512_mask_i32gather_ps(inf, m0, at, &lv[0][0], 4);
            const __m512 hi = _mm512_mask_i32gather_ps(inf, m1, at, &lv[16][0], 4);
            search_regs(lo, hi, L >> 1, A->vals + l * P, gs, c);
        } else
#endif
        {
            float mids[256];
            for (int k = 0; k + 1 < L; k++) mids[k] = lv[k][l];
            search_table(mids, L >> 1, A->vals + l * P, gs, c);
        }
        if (keep) {
            const uint8_t* k = keep + (r + l) * lay.D + o;
            for (int64_t i = 0; i < gs; i++) c[i] = k[i] ? c[i] : (uint8_t)(L - 1);
        }
    }
    return 0;
}

static void adaptive_free(adaptive_scratch* A) {
    free((void*)A->pairs[0]);
    free((void*)A->pairs[1]);
    free(A->vals);
    free(A->keys_rm);
    free(A->key);
    free(A->w);
    free(A->S.srt);
    free(A->S.p1);
}

static int adaptive_init(adaptive_scratch* A, layout lay) {
    const int L = 1 << lay.bits;
    const int64_t P = next_pow2(lay.g), P_last = next_pow2(lay.D - (lay.G - 1) * lay.g);
    A->n_pairs[0] = sort_pairs(P, NULL);
    A->n_pairs[1] = sort_pairs(P_last, NULL);
    int32_t* pairs0 = malloc(sizeof(int32_t) * (size_t)(2 * A->n_pairs[0] + 2));
    int32_t* pairs1 = malloc(sizeof(int32_t) * (size_t)(2 * A->n_pairs[1] + 2));
    A->vals = malloc(sizeof(float) * (size_t)(LANES * P));
    A->keys_rm = malloc(sizeof(int32_t) * (size_t)(LANES * P));
    A->key = malloc(sizeof(int32_t[LANES]) * (size_t)P);
    A->w = malloc(sizeof(float[LANES]) * (size_t)(8 * L));
    A->S.srt = malloc(sizeof(float[LANES]) * (size_t)P);
    A->S.p1 = malloc(sizeof(float[LANES]) * (size_t)(P + 1));
    A->pairs[0] = pairs0;
    A->pairs[1] = pairs1;
    if (!pairs0 || !pairs1 || !A->vals || !A->keys_rm || !A->key || !A->w || !A->S.srt || !A->S.p1) return 2;
    sort_pairs(P, pairs0);
    sort_pairs(P_last, pairs1);
    return 0;
}

static int adaptive_rows(const void* x, int xdt, const uint8_t* keep, int64_t rs, int64_t re, layout lay,
                         int iters, const float* lin, uint16_t* cb, uint8_t* codes, adaptive_scratch* A) {
    int bad = 0;
    for (int64_t gi = 0; gi < lay.G && !bad; gi++)
        for (int64_t r = rs; r < re && !bad; r += LANES) {
            const int nl = (int)(re - r < LANES ? re - r : LANES);
            bad = adaptive_batch(x, xdt, keep, r, nl, gi, lay, iters, lin, cb, codes, rs, A);
        }
    return bad;
}

/* ---------------------------------------------------------------- register-resident groups */
#if defined(__AVX512F__)
/* A group without outliers whose padded size P(g) is 16 n (n = 1..16) held in n registers: the
 * same operations as uniform_group / normal_group, without the passes over memory. */

static inline __attribute__((always_inline)) float tree_vec(__m512* r, const int n) {
    for (int h = n >> 1; h >= 1; h >>= 1)
        for (int i = 0; i < h; i++) r[i] = _mm512_add_ps(r[i], r[i + h]);
    const __m256 lo = _mm512_castps512_ps256(r[0]);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(r[0]), 1));
    return tail8(_mm256_add_ps(lo, hi));
}

/* codes of z (n vectors) among the ascending table (2 top - 1 entries) held in lo/hi (top <= 16)
 * or gathered from tab, stored as bytes (gs of them) */
static inline __attribute__((always_inline)) void codes_vec(const __m512* z, const int n, int64_t gs, int32_t top,
                                                           __m512 lo, __m512 hi, const float* tab, uint8_t* codes) {
    __m512i p[16];
    for (int i = 0; i < n; i++) p[i] = _mm512_setzero_si512();
    if (top <= 16) { /* the steps of all vectors interleaved: independent chains */
        for (int32_t s = top; s >= 1; s >>= 1)
            for (int i = 0; i < n; i++) {
                const __m512 t = _mm512_permutex2var_ps(lo, _mm512_add_epi32(p[i], _mm512_set1_epi32(s - 1)), hi);
                p[i] = _mm512_mask_add_epi32(p[i], _mm512_cmp_ps_mask(t, z[i], _CMP_LT_OQ), p[i], _mm512_set1_epi32(s));
            }
    } else {
        for (int32_t s = top; s >= 1; s >>= 1)
            for (int i = 0; i < n; i++) {
                const __m512 t = _mm512_i32gather_ps(_mm512_add_epi32(p[i], _mm512_set1_epi32(s - 1)), tab, 4);
                p[i] = _mm512_mask_add_epi32(p[i], _mm512_cmp_ps_mask(t, z[i], _CMP_LT_OQ), p[i], _mm512_set1_epi32(s));
            }
    }
    for (int i = 0; i < n && 16 * i < gs; i++)
        _mm_mask_storeu_epi8(codes + 16 * i, lane_mask(gs - 16 * i), _mm512_cvtepi32_epi8(p[i]));
}

static inline __attribute__((always_inline)) int uniform_regs(const float* v, int64_t gs, const int n, int bits,
                                                             int sym, uint16_t* m0, uint16_t* m1, uint8_t* codes) {
    __m512 r[16];
    __m512 mn = _mm512_set1_ps(INFINITY), mx = _mm512_set1_ps(-INFINITY), am = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        const __mmask16 m = lane_mask(gs - 16 * i);
        r[i] = _mm512_maskz_loadu_ps(m, v + 16 * i);
        mn = _mm512_mask_min_ps(mn, m, mn, r[i]);
        mx = _mm512_mask_max_ps(mx, m, mx, r[i]);
        am = _mm512_max_ps(am, _mm512_abs_ps(r[i]));
    }
    if (!(_mm512_reduce_max_ps(am) <= BIG)) return 1;
    float off, s;
    uniform_meta(_mm512_reduce_min_ps(mn), _mm512_reduce_max_ps(mx), bits, sym, m0, m1, &off, &s);
    const __m512 vo = _mm512_set1_ps(off), vs = _mm512_set1_ps(s), vl = _mm512_set1_ps((float)((1 << bits) - 1));
    for (int i = 0; i < n && 16 * i < gs; i++) {
        __m512 c = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(r[i], vo), vs),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c = _mm512_min_ps(_mm512_max_ps(c, _mm512_setzero_ps()), vl);
        _mm_mask_storeu_epi8(codes + 16 * i, lane_mask(gs - 16 * i), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(c)));
    }
    return 0;
}

static inline __attribute__((always_inline)) int normal_regs(const float* v, int64_t gs, const int n, int bits,
                                                            const float* bnd, __m512 lo, __m512 hi, uint16_t* m0,
                                                            uint16_t* m1, uint8_t* codes) {
    __m512 r[16], t[16];
    __m512 am = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        r[i] = _mm512_maskz_loadu_ps(lane_mask(gs - 16 * i), v + 16 * i); /* zero padding */
        am = _mm512_max_ps(am, _mm512_abs_ps(r[i]));
        t[i] = r[i];
    }
    if (!(_mm512_reduce_max_ps(am) <= BIG)) return 1;
    const float cnt = gs < 1 ? 1.f : (float)gs;
    const float mean = tree_vec(t, n) / cnt;
    const __m512 vm = _mm512_set1_ps(mean);
    for (int i = 0; i < n; i++) { /* padding: ((0 - mean) * 0)**2 = +0 */
        const __m512 d = _mm512_maskz_sub_ps(lane_mask(gs - 16 * i), r[i], vm);
        t[i] = _mm512_mul_ps(d, d);
    }
    const float var = tree_vec(t, n) / cnt;
    const uint16_t mh = f2h(mean), sh = clamp_tiny(f2h(sqrtf(var)));
    *m0 = mh;
    *m1 = sh;
    const __m512 mf = _mm512_set1_ps(h2f(mh)), sf = _mm512_set1_ps(h2f(sh));
    for (int i = 0; i < n; i++) t[i] = _mm512_div_ps(_mm512_sub_ps(r[i], mf), sf);
    codes_vec(t, n, gs, (1 << bits) >> 1, lo, hi, bnd, codes);
    return 0;
}

#define REGS_CASES(CALL) \
    switch (P / 16) {    \
        case 1: CALL(1); \
        case 2: CALL(2); \
        case 4: CALL(4); \
        case 8: CALL(8); \
        case 16: CALL(16); \
        default: break;  \
    }

/* the group through the register path when it applies (returns 0/1), else -1 */
static int group_regs(int method, const float* v, int64_t gs, int64_t g, int bits, int sym, const float* bnd,
                      __m512 lo, __m512 hi, uint16_t* m0, uint16_t* m1, uint8_t* codes) {
    const int64_t P = next_pow2(method == NORMAL ? g : gs);
    if (P < 16 || P > 256) return -1;
    if (method == UNIFORM) {
#define U(N) return uniform_regs(v, gs, N, bits, sym, m0, m1, codes)
        REGS_CASES(U)
#undef U
    } else {
#define NR(N) return normal_regs(v, gs, N, bits, bnd, lo, hi, m0, m1, codes)
        REGS_CASES(NR)
#undef NR
    }
    return -1;
}
#endif

/* ---------------------------------------------------------------- encode driver */
int kvq_encode(int method, const void* x, int xdt, const uint8_t* keep, int64_t r0, int64_t r1, int64_t D,
               int64_t g, int bits, int sym, int iters, const float* table, uint16_t* m0, uint16_t* m1,
               uint8_t* packed) {
    const layout lay = {D, g, (D + g - 1) / g, bits};
    float* row = (float*)malloc((size_t)D * 4);
    float* tmp = (float*)malloc((size_t)next_pow2(g) * 4);
    uint8_t* codes = (uint8_t*)malloc((size_t)(SUB_ROWS * D));
    adaptive_scratch A;
    memset(&A, 0, sizeof A);
    int bad = (!row || !tmp || !codes) ? 2 : 0;
    if (!bad && method == ADAPTIVE) bad = adaptive_init(&A, lay);
    for (int64_t rs = r0; rs < r1 && !bad; rs += SUB_ROWS) {
        const int64_t re = rs + SUB_ROWS < r1 ? rs + SUB_ROWS : r1;
        if (method == ADAPTIVE) {
            bad = adaptive_rows(x, xdt, keep, rs, re, lay, iters, table, m0, codes, &A);
        } else {
#if defined(__AVX512F__)
            float pad[32];
            for (int k = 0; k < 32; k++) pad[k] = (method == NORMAL && k < (1 << bits) - 1) ? table[k] : INFINITY;
            const __m512 lo = _mm512_loadu_ps(pad), hi = _mm512_loadu_ps(pad + 16);
#endif
            for (int64_t r = rs; r < re && !bad; r++) {
                load_row(x, xdt, r * D, D, row);
                for (int64_t gi = 0; gi < lay.G && !bad; gi++) {
                    const int64_t o = gi * g, gs = D - o < g ? D - o : g;
                    const uint8_t* k = keep ? keep + r * D + o : NULL;
                    uint8_t* c = codes + (r - rs) * D + o;
#if defined(__AVX512F__)
                    if (!k) {
                        const int done = group_regs(method, row + o, gs, g, bits, sym, table, lo, hi,
                                                    m0 + r * lay.G + gi, sym ? NULL : m1 + r * lay.G + gi, c);
                        if (done >= 0) {
                            bad = done;
                            continue;
                        }
                    }
#endif
                    if (method == UNIFORM)
                        bad = uniform_group(row + o, k, gs, bits, sym, m0 + r * lay.G + gi,
                                            sym ? NULL : m1 + r * lay.G + gi, c);
                    else
                        bad = normal_group(row + o, k, gs, g, bits, table, m0 + r * lay.G + gi,
                                           m1 + r * lay.G + gi, c, tmp);
                }
            }
        }
        if (!bad) pack(codes, (re - rs) * D, bits, packed + (rs * D / 8) * bits);
    }
    if (method == ADAPTIVE) adaptive_free(&A);
    free(row);
    free(tmp);
    free(codes);
    return bad;
}

/* ---------------------------------------------------------------- decode */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define DECODE_REGS 1
/* 16 floats (lanes m) into out at element off, in dtype dt, rounded as torch converts */
static inline void emit16(void* out, int dt, int64_t off, __m512 v, __mmask16 m) {
    if (dt == F32) {
        _mm512_mask_storeu_ps((float*)out + off, m, v);
    } else if (dt == F16) {
        _mm256_mask_storeu_epi16((uint16_t*)out + off, m,
                                 _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        _mm256_mask_storeu_epi16((uint16_t*)out + off, m, _mm512_cvtepi32_epi16(h));
    }
}

/* one group's codes (gs of them) to values, straight into out */
static inline void decode_group_regs(int method, const uint8_t* cg, int64_t gs, float off, float sc, __m512 lo,
                                     __m512 hi, void* out, int odt, int64_t at) {
    const __m512 vo = _mm512_set1_ps(off), vs = _mm512_set1_ps(sc);
    for (int64_t i = 0; i < gs; i += 16) {
        const __mmask16 m = lane_mask(gs - i);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, cg + i));
        __m512 y;
        if (method == UNIFORM)
            y = _mm512_add_ps(vo, _mm512_mul_ps(_mm512_cvtepi32_ps(c), vs));
        else if (method == NORMAL)
            y = _mm512_add_ps(vo, _mm512_mul_ps(vs, _mm512_permutex2var_ps(lo, c, hi)));
        else
            y = _mm512_permutex2var_ps(lo, c, hi);
        emit16(out, odt, at + i, y, m);
    }
}
#endif

/* rows [r0, r1) of a part into out (dtype odt, D columns) at rows idx[r] (or r) */
int kvq_decode(int method, const uint8_t* packed, int64_t r0, int64_t r1, int64_t D, int64_t g, int bits,
               int sym, const uint16_t* m0, const uint16_t* m1, const float* table, void* out, int odt,
               const int64_t* idx) {
    const int L = 1 << bits;
    const int64_t G = (D + g - 1) / g;
    uint8_t* codes = (uint8_t*)malloc((size_t)(SUB_ROWS * D));
    float* row = (float*)malloc((size_t)D * 4);
    float lv[256] = {0}, tab[256] = {0};
    if (method == NORMAL) memcpy(tab, table, sizeof(float) * (size_t)L);
    if (!codes || !row) {
        free(codes);
        free(row);
        return 2;
    }
    for (int64_t rs = r0; rs < r1; rs += SUB_ROWS) {
        const int64_t re = rs + SUB_ROWS < r1 ? rs + SUB_ROWS : r1;
        unpack(packed + (rs * D / 8) * bits, (re - rs) * D, bits, codes);
        for (int64_t r = rs; r < re; r++) {
            const uint8_t* c = codes + (r - rs) * D;
            for (int64_t gi = 0; gi < G; gi++) {
                const int64_t o = gi * g, gs = D - o < g ? D - o : g;
                float* y = row + o;
                const uint8_t* cg = c + o;
#ifdef DECODE_REGS
                if (L <= 32) {
                    const int64_t at = (idx ? idx[r] : r) * D + o;
                    float off = 0.f, sc = 0.f;
                    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
                    if (method == UNIFORM) {
                        sc = h2f(sym ? m0[r * G + gi] : m1[r * G + gi]);
                        off = sym ? (-(float)(L - 1) / 2.f) * sc : h2f(m0[r * G + gi]);
                    } else if (method == NORMAL) {
                        off = h2f(m0[r * G + gi]);
                        sc = h2f(m1[r * G + gi]);
                        lo = _mm512_loadu_ps(tab);
                        hi = _mm512_loadu_ps(tab + 16);
                    } else {
                        const uint16_t* book = m0 + (r * G + gi) * L;
                        lo = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lane_mask(L), book));
                        hi = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lane_mask(L - 16), book + 16));
                    }
                    decode_group_regs(method, cg, gs, off, sc, lo, hi, out, odt, at);
                    continue;
                }
#endif
                if (method == UNIFORM) {
                    /* symmetric: m0 = scale; asymmetric: m0 = zero, m1 = scale */
                    const float sc = h2f(sym ? m0[r * G + gi] : m1[r * G + gi]);
                    const float off = sym ? (-(float)(L - 1) / 2.f) * sc : h2f(m0[r * G + gi]);
                    for (int64_t i = 0; i < gs; i++) y[i] = off + (float)cg[i] * sc;
                } else if (method == NORMAL) {
                    const float mf = h2f(m0[r * G + gi]), sf = h2f(m1[r * G + gi]);
                    lookup(tab, L, cg, gs, y);
                    for (int64_t i = 0; i < gs; i++) y[i] = mf + sf * y[i];
                } else {
                    const uint16_t* book = m0 + (r * G + gi) * L;
                    for (int k = 0; k < L; k++) lv[k] = h2f(book[k]);
                    lookup(lv, L, cg, gs, y);
                }
                store_row(y, gs, out, odt, (idx ? idx[r] : r) * D + o);
            }
        }
    }
    free(codes);
    free(row);
    return 0;
}
