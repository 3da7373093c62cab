/* One DINO view's per-pixel stage, fused: colour jitter (ops in the given order), grayscale, Gaussian blur, the
 * one rounding to uint8 and solarize, in place on a uint8 [3, size, size] crop (planar, contiguous).
 *
 * It computes what dino_scale/data/augment.py's torch path computes (same formulas, same op order, float32, one
 * rounding at the end) in a few passes over the crop instead of ~40 tensor ops; see fused_view.py for why it exists
 * and how it is built. Built without -ffast-math and with -ffp-contract=off, so every float operation is rounded as
 * IEEE float32 demands and the output does not depend on the machine's vector width.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

enum { BRIGHTNESS = 0, CONTRAST = 1, SATURATION = 2, HUE = 3 };

/* torchvision's luma weights (rgb_to_grayscale): r * 0.2989 + g * 0.587 + b * 0.114, left to right. */
static inline float luma(float r, float g, float b) { return r * 0.2989f + g * 0.587f + b * 0.114f; }

static inline float clamp01(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }

/* torchvision's _blend: clamp(x * factor + other * (1 - factor), 0, 1). */
static inline float blend(float x, float other, float factor, float rest) { return clamp01(x * factor + other * rest); }

static void brightness(float *restrict x, long n, float factor) {
    for (long i = 0; i < 3 * n; i++) x[i] = clamp01(x[i] * factor);
}

static void contrast(float *restrict r, float *restrict g, float *restrict b, long n, float factor) {
    /* The mean of the luma image, accumulated in 8 double lanes (the torch path sums in float32 with its own
     * order: the two agree to a few float32 ulps). */
    double lanes[8] = {0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++) lanes[k] += luma(r[i + k], g[i + k], b[i + k]);
    for (; i < n; i++) lanes[0] += luma(r[i], g[i], b[i]);
    double sum = 0.0;
    for (int k = 0; k < 8; k++) sum += lanes[k];
    const float mean = (float)(sum / (double)n), rest = 1.0f - factor;
    for (i = 0; i < n; i++) {
        r[i] = blend(r[i], mean, factor, rest);
        g[i] = blend(g[i], mean, factor, rest);
        b[i] = blend(b[i], mean, factor, rest);
    }
}

static void saturation(float *restrict r, float *restrict g, float *restrict b, long n, float factor) {
    const float rest = 1.0f - factor;
    for (long i = 0; i < n; i++) {
        const float y = luma(r[i], g[i], b[i]);
        r[i] = blend(r[i], y, factor, rest);
        g[i] = blend(g[i], y, factor, rest);
        b[i] = blend(b[i], y, factor, rest);
    }
}

/* augment._adjust_hue's formula: with C = max - min and h the hue in turns (priority r > g > b), channel c becomes
 * (min - C) + 6C * clamp(|frac(h + 1 + factor + n_c / 6) - 1/3|, 1/6, 1/3) for n = (5, 3, 1). */
static inline float hexagon(float h, float offset) {
    float t = h + offset;
    t = t - truncf(t);
    t = fabsf(t - 1.0f / 3.0f);
    return t < 1.0f / 6.0f ? 1.0f / 6.0f : (t > 1.0f / 3.0f ? 1.0f / 3.0f : t);
}

static void hue(float *restrict r, float *restrict g, float *restrict b, long n, float factor) {
    const float shift = 1.0f + factor;
    for (long i = 0; i < n; i++) {
        const float rv = r[i], gv = g[i], bv = b[i];
        const float mgb = gv > bv ? gv : bv, ngb = gv < bv ? gv : bv;
        const float maxc = rv > mgb ? rv : mgb, minc = rv < ngb ? rv : ngb;
        const float chroma = maxc - minc, chroma6 = chroma * 6.0f;
        const float inv6 = 1.0f / (chroma6 > 1e-12f ? chroma6 : 1e-12f);
        const float num = rv == maxc ? gv - bv : (gv == maxc ? (bv - rv) + 2.0f * chroma : (rv - gv) + 4.0f * chroma);
        const float h = num * inv6 + shift;
        const float low = minc - chroma;
        r[i] = low + chroma6 * hexagon(h, 5.0f / 6.0f);
        g[i] = low + chroma6 * hexagon(h, 3.0f / 6.0f);
        b[i] = low + chroma6 * hexagon(h, 1.0f / 6.0f);
    }
}

/* Index of the reflect-padded (torch "reflect": the edge is not repeated) sample at position i of a side of n. */
static inline int reflect(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

/* dst = centre * w0 (first tap), then dst += (a + b) * w (each further pair of taps); restrict lets gcc vectorise. */
static inline void tap_centre(float *restrict dst, const float *restrict centre, float w0, int n) {
    for (int i = 0; i < n; i++) dst[i] = centre[i] * w0;
}

static inline void tap_pair(float *restrict dst, const float *restrict a, const float *restrict b, float w, int n) {
    for (int i = 0; i < n; i++) dst[i] += (a[i] + b[i]) * w;
}

/* Separable Gaussian of one plane, taps w[0] (centre) .. w[radius], reflect borders: rows first, then columns, each
 * as w[0] * x + sum_t w[t] * (x[-t] + x[+t]). `row` holds size + 2 * radius floats, `tmp` size * size. */
static void blur_plane(float *restrict x, int size, int radius, const float *restrict w, float *restrict row,
                       float *restrict tmp) {
    for (int y = 0; y < size; y++) {
        const float *src = x + (long)y * size;
        for (int i = -radius; i < size + radius; i++) row[i + radius] = src[reflect(i, size)];
        float *dst = tmp + (long)y * size;
        tap_centre(dst, row + radius, w[0], size);
        for (int t = 1; t <= radius; t++) tap_pair(dst, row + radius - t, row + radius + t, w[t], size);
    }
    for (int y = 0; y < size; y++) {
        float *dst = x + (long)y * size;
        tap_centre(dst, tmp + (long)y * size, w[0], size);
        for (int t = 1; t <= radius; t++)
            tap_pair(dst, tmp + (long)reflect(y - t, size) * size, tmp + (long)reflect(y + t, size) * size, w[t], size);
    }
}

/* Render one view in place. ops / factors: n_ops colour-jitter ops in application order (0 brightness, 1 contrast,
 * 2 saturation, 3 hue); grayscale: 0 or 1; blur taps w[0..blur_radius] (blur_radius 0: no blur); solarize: 0 or 1.
 * Returns 0, or -1 when scratch memory cannot be allocated (the crop is then untouched). */
int dino_render_view(uint8_t *img, int size, int n_ops, const int *ops, const float *factors, int gray,
                     int blur_radius, const float *blur_w, int solarize) {
    const long n = (long)size * size;
    if (n_ops > 0 || gray || blur_radius > 0) {
        float *x = malloc(sizeof(float) * (size_t)(3 * n + n + size + 2 * blur_radius));
        if (x == NULL) return -1;
        float *r = x, *g = x + n, *b = x + 2 * n;
        for (long i = 0; i < 3 * n; i++) x[i] = (float)img[i] * (1.0f / 255.0f);
        for (int k = 0; k < n_ops; k++) {
            switch (ops[k]) {
                case BRIGHTNESS: brightness(x, n, factors[k]); break;
                case CONTRAST: contrast(r, g, b, n, factors[k]); break;
                case SATURATION: saturation(r, g, b, n, factors[k]); break;
                default: hue(r, g, b, n, factors[k]); break;
            }
        }
        const int planes = gray ? 1 : 3;
        if (gray) {
            for (long i = 0; i < n; i++) r[i] = luma(r[i], g[i], b[i]);
        }
        if (blur_radius > 0) {
            float *tmp = x + 3 * n, *row = tmp + n;
            for (int c = 0; c < planes; c++) blur_plane(x + c * n, size, blur_radius, blur_w, row, tmp);
        }
        /* augment.round_to_uint8: round half up, clamp to [0, 255]. */
        for (int c = 0; c < 3; c++) {
            const float *src = x + (gray ? 0 : c * n);
            uint8_t *dst = img + c * n;
            for (long i = 0; i < n; i++) {
                float v = src[i] * 255.0f + 0.5f;
                v = v < 0.0f ? 0.0f : (v > 255.0f ? 255.0f : v);
                dst[i] = (uint8_t)(int)v;
            }
        }
        free(x);
    }
    if (solarize) {
        /* PIL's solarize(128): v >= 128 -> 255 - v, i.e. v XOR 255 when the top bit is set. */
        for (long i = 0; i < 3 * n; i++) img[i] ^= (uint8_t)(-(img[i] >> 7));
    }
    return 0;
}
