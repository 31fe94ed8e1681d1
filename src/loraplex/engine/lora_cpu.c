/* The per-row LoRA delta of one site of one layer, on CPU, in one call: lora.py's LoraBatch.add_to
 * without PyTorch's per-op cost. Compiled on first use by lora_kernel.py (plain C with OpenMP, no
 * Python or torch headers, called through ctypes).
 *
 * Why hand-written: at decode sizes the delta is ~120 tiny batched GEMVs per step; PyTorch spends
 * ~4 us of fixed cost per op (~1,500 ops a step) and cannot read bf16 weights with fp32 accumulation
 * in one op on CPU (bf16 bmm goes through oneDNN at ~35 us a call). Here each site is one call that
 * streams the adapters' bf16 (or int8) weights once, accumulating in fp32. Measured on the 2-core CI machine,
 * SmolLM2 with 8 all-linear rank-16 adapters: the step overhead went from 1.26x to ~1.1x the base.
 *
 * Per row i with slot s = row_slot[i] (0: the base, nothing added), for each of its L tokens t:
 *     u = A[s] @ (w[i] * x[t])                          (R values, fp32; w = row_scale, or 1 if NULL)
 *     y[t, lo + m*out_m : lo + (m+1)*out_m] += u[seg(m)] @ B_run[s, m]   for each run and module m
 * Weights:  A      [slots, R, in] bf16 or int8 (this layer's slice of LoraStacks.A[site])
 *           B_run  [slots, k, r, out_m] bf16 or int8 (this layer's slice of one LoraStacks.B[site] run)
 *           int8 weights carry one fp32 scale per row of A and per row of B_run ([slots, R] and
 *           [slots, k, r]): the scale multiplies u, once per row, never an element.
 * site:     int64 in, out, address of A, R, A's slot stride, number of runs, address of A's scales
 *           (0: bf16 weights), their slot stride, then 8 per run: address of B_run, k, r, out_m,
 *           first output column, slot stride of B_run, address of its scales, their slot stride.
 * Tokens are taken slot by slot, so a slot's weights (~100 KB per site) are read from memory once.
 * With threads > 1 (torch's OpenMP pool, which this library shares: same libgomp soname), the rows
 * of A and then blocks of output columns are split between threads. One thread runs the same code
 * outside any parallel region: OpenMP's outlined loop bodies vectorised worse (measured ~20% slower).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_COLS 4096 /* output columns per work item of the B phase, at most */

struct job {
    int64_t in, out, R, a_slot_stride, as_slot_stride, nt, ng, nblocks, cols, L, nruns;
    int act_bf16, wq; /* wq: int8 weights with per-row scales (else bf16) */
    const float *scale; /* per row, the weight on its delta (NULL: 1): applied to the row's input */
    const void *x;
    void *y;
    const void *A;
    const float *A_scale;
    const int64_t *runs, *order, *gstart, *gslot, *blk, *uoffs;
    float *xf, *u;
};

static void barrier(int nth) {
#ifdef _OPENMP
    if (nth > 1) {
#pragma omp barrier
    }
#else
    (void)nth;
#endif
}

#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline)) /* out-of-line, the B loop vectorised worse */
#else
#define INLINE static inline
#endif

#define RUN 8 /* int64 values per run in a site descriptor */

/* element i of a weight row: int8 (its row's scale applied to the sum, not here) or bf16. Every
 * caller passes wq as a constant through always-inline functions (see work()), so each format gets
 * its own loops, vectorised for that format, with no branch inside them. */
INLINE float wload(const void *p, int64_t i, int wq) {
    return wq ? (float)((const int8_t *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

INLINE const void *wrow(const void *p, int64_t elements, int wq) {
    return wq ? (const void *)((const int8_t *)p + elements) : (const void *)((const uint16_t *)p + elements);
}

INLINE void convert_x(const struct job *jb, int64_t j0, int64_t j1) {
    const int64_t in = jb->in;
    for (int64_t j = j0; j < j1; j++) {
        const int64_t t = jb->order[j];
        if (jb->act_bf16)
            for (int64_t i = 0; i < in; i++) jb->xf[t * in + i] = bf16_to_f32(((const uint16_t *)jb->x)[t * in + i]);
        else
            memcpy(jb->xf + t * in, (const float *)jb->x + t * in, sizeof(float) * (size_t)in);
        if (jb->scale) {
            const float s = jb->scale[t / jb->L];
            for (int64_t i = 0; i < in; i++) jb->xf[t * in + i] *= s;
        }
    }
}

/* Asks for bytes [lo, hi) of p before they are used, a cache line at a time. Each slot's weights are
 * read from memory once a step; with the next phase's weights asked for while this one computes (the
 * slot's B during its A rows, the next slot's A during B), the LoRA share of SmolLM2's int4 decode
 * step with 8 rows on 8 all-linear adapters went from ~11.3 to ~10.1 ms (1 thread, AVX-512 Xeon,
 * `bench/lora_step_overhead.py --quantize int4`, two alternated runs each). */
INLINE void prefetch_range(const void *p, int64_t lo, int64_t hi) {
    for (int64_t o = lo & ~(int64_t)63; o < hi; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* share `part` of `parts` of every B run of group g's slot */
INLINE void prefetch_b(const struct job *jb, int64_t g, int64_t part, int64_t parts, int wq) {
    for (int64_t q = 0; q < jb->nruns; q++) {
        const int64_t *d = jb->runs + RUN * q, bytes = (wq ? 1 : 2) * d[1] * d[2] * d[3];
        prefetch_range(wrow((const void *)(uintptr_t)d[0], jb->gslot[g] * d[5], wq), bytes * part / parts,
                       bytes * (part + 1) / parts);
    }
}

/* u = A rows [rr0, rr1) of group g's slot . each of its tokens. Tokens go four at a time: each
 * element of A is converted once for four independent sums (prefill: measured ~2x faster). */
INLINE void a_phase(const struct job *jb, int64_t g, int64_t rr0, int64_t rr1, int wq) {
    const int64_t in = jb->in, R = jb->R, g0 = jb->gstart[g], gn = jb->gstart[g + 1] - g0;
    const void *As = wrow(jb->A, jb->gslot[g] * jb->a_slot_stride, wq);
    const float *sc = wq ? jb->A_scale + jb->gslot[g] * jb->as_slot_stride : NULL;
    const int64_t *order = jb->order + g0;
    float *u = jb->u;
    for (int64_t rr = rr0; rr < rr1; rr++) {
        const void *a = wrow(As, rr * in, wq);
        const float k = wq ? sc[rr] : 1.f;
        prefetch_b(jb, g, rr, R, wq);
        int64_t j = 0;
        for (; j + 4 <= gn; j += 4) {
            const float *x0 = jb->xf + order[j] * in, *x1 = jb->xf + order[j + 1] * in;
            const float *x2 = jb->xf + order[j + 2] * in, *x3 = jb->xf + order[j + 3] * in;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            for (int64_t i = 0; i < in; i++) {
                const float av = wload(a, i, wq);
                s0 += av * x0[i];
                s1 += av * x1[i];
                s2 += av * x2[i];
                s3 += av * x3[i];
            }
            u[order[j] * R + rr] = s0 * k;
            u[order[j + 1] * R + rr] = s1 * k;
            u[order[j + 2] * R + rr] = s2 * k;
            u[order[j + 3] * R + rr] = s3 * k;
        }
        for (; j < gn; j++) {
            const float *xt = jb->xf + order[j] * in;
            float s = 0.f;
            for (int64_t i = 0; i < in; i++) s += wload(a, i, wq) * xt[i];
            u[order[j] * R + rr] = s * k;
        }
    }
}

/* y[t, w columns from col] += ut[r] @ B[r, w columns] (B rows om apart), for one token; with pf, bytes
 * [pf_lo, pf_hi) of pf are asked for a share per B row, not all at once (see b_phase) */
INLINE void b_one(const float *ut, const void *B, const float *bs, int64_t r, int64_t om, int64_t w, float *acc,
                  const void *pf, int64_t pf_lo, int64_t pf_hi, int wq) {
    memset(acc, 0, sizeof(float) * (size_t)w);
    for (int64_t rr = 0; rr < r; rr++) {
        if (pf) prefetch_range(pf, pf_lo + (pf_hi - pf_lo) * rr / r, pf_lo + (pf_hi - pf_lo) * (rr + 1) / r);
        const void *br = wrow(B, rr * om, wq);
        const float cu = wq ? ut[rr] * bs[rr] : ut[rr];
        for (int64_t i = 0; i < w; i++) acc[i] += cu * wload(br, i, wq);
    }
}

/* the same for four tokens over 64 columns, the sums held in registers and each B element
 * converted once for four tokens (prefill: several tokens per slot) */
INLINE void b_four(const float *u0, const float *u1, const float *u2, const float *u3, const void *B, const float *bs,
                   int64_t r, int64_t om, float acc[4][64], int wq) {
    float a0[64] = {0}, a1[64] = {0}, a2[64] = {0}, a3[64] = {0};
    for (int64_t rr = 0; rr < r; rr++) {
        const void *br = wrow(B, rr * om, wq);
        const float k = wq ? bs[rr] : 1.f;
        const float c0 = u0[rr] * k, c1 = u1[rr] * k, c2 = u2[rr] * k, c3 = u3[rr] * k;
        for (int i = 0; i < 64; i++) {
            const float bv = wload(br, i, wq);
            a0[i] += c0 * bv;
            a1[i] += c1 * bv;
            a2[i] += c2 * bv;
            a3[i] += c3 * bv;
        }
    }
    memcpy(acc[0], a0, sizeof a0);
    memcpy(acc[1], a1, sizeof a1);
    memcpy(acc[2], a2, sizeof a2);
    memcpy(acc[3], a3, sizeof a3);
}

INLINE void add_row(const struct job *jb, int64_t t, int64_t col, int64_t w, const float *acc) {
    if (jb->act_bf16) {
        uint16_t *yt = (uint16_t *)jb->y + t * jb->out + col;
        for (int64_t i = 0; i < w; i++) yt[i] = f32_to_bf16(bf16_to_f32(yt[i]) + acc[i]);
    } else {
        float *yt = (float *)jb->y + t * jb->out + col;
        for (int64_t i = 0; i < w; i++) yt[i] += acc[i];
    }
}

/* y += u @ B over output blocks [b0, b1) for group g's tokens. One token reads whole B rows (long
 * rows stream best from memory); four at a time go 64 columns at a time from cache. */
INLINE void b_phase(const struct job *jb, int64_t g, int64_t b0, int64_t b1, int wq) {
    const int64_t R = jb->R, g0 = jb->gstart[g], gn = jb->gstart[g + 1] - g0, slot = jb->gslot[g];
    const int64_t *order = jb->order + g0;
    float acc[MAX_COLS], acc4[4][64];
    const int64_t a_bytes = (wq ? 1 : 2) * R * jb->in;
    for (int64_t bi = b0; bi < b1; bi++) {
        /* the next slot's A, a share per block. Decoding (fewer than four tokens) spreads the share
         * over the B rows of the first token's product: asked for at once, a few hundred lines at a
         * block's start (a module's whole row is one block), most waited on the busy line-fill
         * buffers. 8 decode rows on 8 all-linear adapters, SmolLM2's 120 sites from memory: 0.85-0.94x
         * the time (old and new builds alternated in one process, three runs, 1 thread, 2-core Zen 4). */
        const void *pf = g + 1 < jb->ng ? wrow(jb->A, jb->gslot[g + 1] * jb->a_slot_stride, wq) : NULL;
        const int64_t pf_lo = a_bytes * (bi - b0) / (b1 - b0), pf_hi = a_bytes * (bi - b0 + 1) / (b1 - b0);
        if (pf && gn >= 4) prefetch_range(pf, pf_lo, pf_hi);
        const int64_t q = jb->blk[3 * bi], m = jb->blk[3 * bi + 1], c0 = jb->blk[3 * bi + 2];
        const int64_t *d = jb->runs + RUN * q;
        const int64_t r = d[2], om = d[3], col = d[4] + m * om + c0;
        const int64_t w = om - c0 < jb->cols ? om - c0 : jb->cols;
        const void *B = wrow((const void *)(uintptr_t)d[0], slot * d[5] + m * r * om + c0, wq);
        const float *bs = wq ? (const float *)(uintptr_t)d[6] + slot * d[7] + m * r : NULL;
        const int64_t uo = jb->uoffs[q] + m * r;
        int64_t j = 0;
        for (; j + 4 <= gn; j += 4) {
            const int64_t t0 = order[j], t1 = order[j + 1], t2 = order[j + 2], t3 = order[j + 3];
            int64_t c = 0;
            for (; c + 64 <= w; c += 64) {
                b_four(jb->u + t0 * R + uo, jb->u + t1 * R + uo, jb->u + t2 * R + uo, jb->u + t3 * R + uo,
                       wrow(B, c, wq), bs, r, om, acc4, wq);
                add_row(jb, t0, col + c, 64, acc4[0]);
                add_row(jb, t1, col + c, 64, acc4[1]);
                add_row(jb, t2, col + c, 64, acc4[2]);
                add_row(jb, t3, col + c, 64, acc4[3]);
            }
            for (int64_t k = 0; c < w && k < 4; k++) { /* columns left over: one token at a time */
                const int64_t t = order[j + k];
                b_one(jb->u + t * R + uo, wrow(B, c, wq), bs, r, om, w - c, acc, NULL, 0, 0, wq);
                add_row(jb, t, col + c, w - c, acc);
            }
        }
        for (; j < gn; j++) {
            const int64_t t = order[j];
            b_one(jb->u + t * R + uo, B, bs, r, om, w, acc, j == 0 ? pf : NULL, pf_lo, pf_hi, wq);
            add_row(jb, t, col, w, acc);
        }
    }
}

/* Thread tid of nth. With at least as many slots as threads, each thread takes whole slots (tokens
 * and u rows are per token, so threads never meet); otherwise every slot's A rows and then its
 * output blocks are split between threads, with barriers between the phases. */
INLINE void work_as(const struct job *jb, int64_t tid, int64_t nth, int wq) {
    if (jb->ng >= nth) {
        for (int64_t g = tid; g < jb->ng; g += nth) {
            convert_x(jb, jb->gstart[g], jb->gstart[g + 1]);
            a_phase(jb, g, 0, jb->R, wq);
            b_phase(jb, g, 0, jb->nblocks, wq);
        }
        return;
    }
    convert_x(jb, tid * jb->nt / nth, (tid + 1) * jb->nt / nth);
    barrier((int)nth);
    for (int64_t g = 0; g < jb->ng; g++) {
        a_phase(jb, g, tid * jb->R / nth, (tid + 1) * jb->R / nth, wq);
        barrier((int)nth);
        b_phase(jb, g, tid * jb->nblocks / nth, (tid + 1) * jb->nblocks / nth, wq);
        barrier((int)nth); /* u is rewritten by the next group */
    }
}

static void work(const struct job *jb, int64_t tid, int64_t nth) {
    if (jb->wq)
        work_as(jb, tid, nth, 1);
    else
        work_as(jb, tid, nth, 0);
}

/* returns 0, or -1 when scratch memory could not be allocated (nothing was written) */
int lora_site(int64_t n, int64_t L, const void *x, void *y, int32_t act_bf16, const int32_t *row_slot,
              const float *row_scale, const int64_t *site, int32_t threads) {
    const int64_t in = site[0], out = site[1], R = site[3], a_slot_stride = site[4], nruns = site[5];
    const void *A = (const void *)(uintptr_t)site[2];
    const float *A_scale = (const float *)(uintptr_t)site[6];
    const int64_t as_slot_stride = site[7], *runs = site + 8, T = n * L;
    float *xf = malloc(sizeof(float) * (size_t)(T * in + T * R));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)(T + 2 * n + 1 + nruns + 1));
    int64_t *blk = NULL;
    if (!xf || !order) goto oom;
    int64_t *gstart = order + T, *gslot = gstart + n + 1, *uoffs = gslot + n;
    /* tokens in slot order: group g is order[gstart[g] .. gstart[g+1]) on slot gslot[g] */
    int64_t ng = 0, nt = 0;
    for (int64_t row = 0; row < n; row++) {
        const int32_t slot = row_slot[row];
        int seen = slot <= 0;
        for (int64_t g = 0; g < ng && !seen; g++) seen = gslot[g] == slot;
        if (seen) continue;
        gstart[ng] = nt;
        gslot[ng++] = slot;
        for (int64_t r2 = row; r2 < n; r2++)
            if (row_slot[r2] == slot)
                for (int64_t t = r2 * L; t < (r2 + 1) * L; t++) order[nt++] = t;
    }
    gstart[ng] = nt;
    /* work items of the B phase: (run, module, first column) blocks of at most `cols` columns. Long
     * rows stream best (the hardware prefetcher follows them), so whole module rows unless threads
     * share a slot (see work()): then about two blocks per thread, in multiples of 64 columns. */
    int64_t cols = MAX_COLS, nblocks = 0;
    if (threads > 1 && ng < threads) {
        int64_t total = 0;
        for (int64_t q = 0; q < nruns; q++) total += runs[RUN * q + 1] * runs[RUN * q + 3];
        cols = (total / (2 * threads) + 63) / 64 * 64;
        cols = cols < 64 ? 64 : cols > MAX_COLS ? MAX_COLS : cols;
    }
    for (int64_t q = 0; q < nruns; q++) nblocks += runs[RUN * q + 1] * ((runs[RUN * q + 3] + cols - 1) / cols);
    blk = malloc(sizeof(int64_t) * (size_t)(3 * nblocks + 1));
    if (!blk) goto oom;
    int64_t b = 0;
    uoffs[0] = 0;
    for (int64_t q = 0; q < nruns; q++) {
        const int64_t k = runs[RUN * q + 1], om = runs[RUN * q + 3];
        for (int64_t m = 0; m < k; m++)
            for (int64_t c = 0; c < om; c += cols, b++) {
                blk[3 * b] = q;
                blk[3 * b + 1] = m;
                blk[3 * b + 2] = c;
            }
        uoffs[q + 1] = uoffs[q] + k * runs[RUN * q + 2];
    }
    const struct job jb = {.in = in, .out = out, .R = R, .a_slot_stride = a_slot_stride,
                           .as_slot_stride = as_slot_stride, .nt = nt, .ng = ng, .nblocks = nblocks, .cols = cols,
                           .L = L, .nruns = nruns, .act_bf16 = act_bf16, .wq = A_scale != NULL, .scale = row_scale,
                           .x = x, .y = y, .A = A, .A_scale = A_scale, .runs = runs, .order = order,
                           .gstart = gstart, .gslot = gslot, .blk = blk, .uoffs = uoffs, .xf = xf, .u = xf + T * in};
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        work(&jb, omp_get_thread_num(), omp_get_num_threads());
    } else
#endif
        work(&jb, 0, 1);
    free(xf);
    free(order);
    free(blk);
    return 0;
oom:
    free(xf);
    free(order);
    free(blk);
    return -1;
}
