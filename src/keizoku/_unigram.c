/* keizoku._unigram: exact Unigram (SentencePiece-style) encoding, as Hugging Face `tokenizers` does it, in C.
 *
 * Why: `tokenizers` encodes Japanese text with a Unigram model (llm-jp-3) at a few MB per CPU-second: its trie
 * has a hash map per node, and every match costs a Vec, a String and another hash lookup for the id. This does the
 * same Viterbi search over a double-array trie (a BMP character's first step from a table), with no allocation
 * per match, and packs ids straight into the output buffer: 20-30x tokenizers' speed per core on Japanese and
 * English text (bench/tokenize/unigram_speed.py). What is left is the trie walk's memory latency.
 *
 * What it reproduces (tokenizers 0.2x: models/unigram/model.rs `encode_optimized` + `tokenize`,
 * pre_tokenizers/metaspace.rs, normalizers/replace.rs), for a tokenizer whose normalizer is Replace(' ' -> R)
 * or none, whose pre-tokenizer is Metaspace(R, split=false), and whose model is Unigram (keizoku.data.unigram
 * checks that shape):
 *
 *  - the text: every ' ' becomes R, and R is put in front when the scheme prepends and the text does not
 *    already start with R (after the replacement). An empty text has no tokens.
 *  - Viterbi, forward: for each character boundary `pos` in order, for each vocabulary piece that is a prefix
 *    of text[pos..] in order of length, the path ending at pos + len is replaced when score + best(pos) is
 *    strictly greater (the first candidate wins a tie); when no piece is exactly the character at pos, an
 *    unknown node of that character with score min_score - 10 is offered last. Scores are doubles (f64), added
 *    in the same order.
 *  - the best path, read back from the end; consecutive nodes whose id is unk_id (unknown characters, or the
 *    unk piece itself) are fused into one string (fuse_unk). A fused string that is a piece is that piece; else,
 *    with byte_fallback, its UTF-8 bytes as <0xXX> pieces when all of them exist; else unk_id.
 *  - a piece that occurs several times in the vocabulary means its last id (tokenizers' token -> id map).
 *
 * Added tokens are split out by `tokenizers` before normalisation; a document that contains the text of one of
 * them (`markers`) is handed back to the caller (encode returns None; encode_pack calls `fallback`), as is one
 * that needs an unknown node when there is no unk_id, or that is not valid UTF-8 (lone surrogates).
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FREE_SLOT UINT32_MAX
#define TERM 0x80000000u     /* in DANode.base: a piece ends at this node */
#define UNK_PENALTY 10.0     /* tokenizers' K_UNK_PENALTY */

/* Double-array trie over bytes: the child of node s by byte c is t = base(s) + c when check[t] == s.
 * Node 0 is the root. Nodes without children have base 0 (no slot is checked against them). */
typedef struct {
    uint32_t base;   /* TERM | base */
    uint32_t check;  /* parent node; FREE_SLOT for an unused slot */
} DANode;

/* per node: the piece ending there (one cache line fetch gives both) */
typedef struct {
    double score;
    int32_t id;             /* -1: none */
    int32_t unused;
} Piece;

typedef struct {
    PyObject_HEAD
    DANode *da;
    Piece *piece;
    uint32_t da_size;
    uint32_t *first;        /* BMP code point -> the node reached from the root by its UTF-8 bytes (0: none) */
    int32_t byte_id[256];   /* id of <0xXX> (-1: missing) */
    int32_t unk_id;         /* -1: none */
    int byte_fallback;
    double unk_score;
    uint8_t repl[8];
    int repl_len;
    int prepend;
    /* documents containing one of these go to the fallback */
    Py_ssize_t n_markers;
    char **markers;
    Py_ssize_t *marker_len;
    uint8_t marker_firsts[256];
    int n_marker_firsts;
} Encoder;

/* ---- building the double array ------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *p;
    uint32_t len;
    int32_t id;
} Key;

typedef struct {
    DANode *da;
    int32_t *id;
    uint32_t *nxt, *prv;  /* doubly linked list of free slots, in index order */
    uint32_t cap, head, tail;
    uint32_t max_base;
} Builder;

#define NONE UINT32_MAX

static int key_cmp(const void *a, const void *b) {
    const Key *x = a, *y = b;
    uint32_t m = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->p, y->p, m);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id; /* equal pieces: by id, so the last one is the highest */
}

static int builder_grow(Builder *B, uint32_t need) {
    if (need <= B->cap) return 0;
    uint32_t cap = B->cap ? B->cap : 1024;
    while (cap < need) {
        if (cap > (1u << 30)) { PyErr_SetString(PyExc_ValueError, "vocabulary too large"); return -1; }
        cap *= 2;
    }
    DANode *da = PyMem_Realloc(B->da, sizeof(DANode) * cap);
    if (da) B->da = da;
    int32_t *id = PyMem_Realloc(B->id, sizeof(int32_t) * cap);
    if (id) B->id = id;
    uint32_t *nxt = PyMem_Realloc(B->nxt, sizeof(uint32_t) * cap);
    if (nxt) B->nxt = nxt;
    uint32_t *prv = PyMem_Realloc(B->prv, sizeof(uint32_t) * cap);
    if (prv) B->prv = prv;
    if (!da || !id || !nxt || !prv) { PyErr_NoMemory(); return -1; }
    for (uint32_t i = B->cap; i < cap; i++) {
        B->da[i].base = 0; B->da[i].check = FREE_SLOT; B->id[i] = -1;
        B->prv[i] = B->tail; B->nxt[i] = NONE;
        if (B->tail == NONE) B->head = i; else B->nxt[B->tail] = i;
        B->tail = i;
    }
    B->cap = cap;
    return 0;
}

static void builder_take(Builder *B, uint32_t t, uint32_t parent) {
    uint32_t p = B->prv[t], n = B->nxt[t];
    if (p == NONE) B->head = n; else B->nxt[p] = n;
    if (n == NONE) B->tail = p; else B->prv[n] = p;
    B->da[t].check = parent;
}

/* A base where every label's slot is free (labels ascending, k >= 1). */
static int64_t builder_find_base(Builder *B, const uint8_t *labels, int k) {
    for (;;) {
        for (uint32_t f = B->head; f != NONE; f = B->nxt[f]) {
            if (f <= labels[0]) continue; /* base >= 1: no child is the root */
            uint32_t b = f - labels[0];
            if ((uint64_t)b + labels[k - 1] >= B->cap) {
                if (builder_grow(B, b + labels[k - 1] + 1) < 0) return -1;
            }
            int ok = 1;
            for (int i = 1; i < k && ok; i++) ok = B->da[b + labels[i]].check == FREE_SLOT;
            if (ok) return b;
        }
        if (builder_grow(B, B->cap * 2) < 0) return -1;
    }
}

/* keys[lo..hi) share their first `depth` bytes, which lead to node s */
static int builder_insert(Builder *B, const Key *keys, size_t lo, size_t hi, uint32_t depth, uint32_t s) {
    size_t i = lo;
    uint32_t term = 0;
    if (keys[i].len == depth) {  /* sorted: the key that ends here comes first (deduplicated: once) */
        B->id[s] = keys[i].id; term = TERM; i++;
    }
    if (i == hi) { B->da[s].base = term; return 0; }
    uint8_t labels[256]; int k = 0;
    for (size_t j = i; j < hi; j++) {
        uint8_t c = keys[j].p[depth];
        if (k == 0 || labels[k - 1] != c) labels[k++] = c;
    }
    int64_t b = builder_find_base(B, labels, k);
    if (b < 0) return -1;
    if (b >= (int64_t)TERM - 256) { PyErr_SetString(PyExc_ValueError, "vocabulary too large"); return -1; }
    B->da[s].base = (uint32_t)b | term;
    if ((uint32_t)b > B->max_base) B->max_base = (uint32_t)b;
    for (int j = 0; j < k; j++) builder_take(B, (uint32_t)b + labels[j], s);
    size_t g = i;
    for (int j = 0; j < k; j++) {
        size_t h = g;
        while (h < hi && keys[h].p[depth] == labels[j]) h++;
        if (builder_insert(B, keys, g, h, depth + 1, (uint32_t)b + labels[j]) < 0) return -1;
        g = h;
    }
    return 0;
}

/* node reached from `s` by bytes p[0..n); 0 when there is none (the root is never a child) */
static uint32_t da_walk(const Encoder *e, uint32_t s, const uint8_t *p, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t t = (e->da[s].base & ~TERM) + p[i];
        if (e->da[t].check != s) return 0;
        s = t;
    }
    return s;
}

/* the id of the piece that is exactly p[0..n), or -1 */
static int32_t piece_id(const Encoder *e, const uint8_t *p, Py_ssize_t n) {
    if (n == 0) return -1;
    uint32_t s = da_walk(e, 0, p, n);
    return s ? e->piece[s].id : -1;
}

/* ---- encoding ------------------------------------------------------------------------------------------------- */

typedef struct { uint32_t *p; Py_ssize_t n, cap; } IdBuf;

static int ids_reserve(IdBuf *b, Py_ssize_t more) {
    if (b->n + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + more) cap *= 2;
    uint32_t *p = PyMem_Realloc(b->p, (size_t)cap * sizeof(uint32_t));
    if (!p) { PyErr_NoMemory(); return -1; }
    b->p = p; b->cap = cap;
    return 0;
}

static inline int ids_push(IdBuf *b, uint32_t v) {
    if (b->n == b->cap && ids_reserve(b, 1) < 0) return -1;
    b->p[b->n++] = v;
    return 0;
}

/* Per-call scratch: the normalised text and the lattice (one entry per byte position). */
typedef struct {
    uint8_t *norm; Py_ssize_t norm_cap;
    double *score; int32_t *start, *id; Py_ssize_t lat_cap;
    uint32_t *rev; Py_ssize_t rev_cap;
} Work;

static void work_free(Work *w) {
    PyMem_Free(w->norm); PyMem_Free(w->score); PyMem_Free(w->start); PyMem_Free(w->id); PyMem_Free(w->rev);
    memset(w, 0, sizeof(*w));
}

static int work_reserve(Work *w, Py_ssize_t norm, Py_ssize_t lat) {
    if (norm > w->norm_cap) {
        Py_ssize_t cap = norm > 4096 ? norm + norm / 2 : 4096;
        uint8_t *p = PyMem_Realloc(w->norm, (size_t)cap);
        if (!p) { PyErr_NoMemory(); return -1; }
        w->norm = p; w->norm_cap = cap;
    }
    if (lat > w->lat_cap) {
        Py_ssize_t cap = lat > 4096 ? lat + lat / 2 : 4096;
        double *sc = PyMem_Realloc(w->score, (size_t)cap * sizeof(double));
        if (sc) w->score = sc;
        int32_t *st = PyMem_Realloc(w->start, (size_t)cap * sizeof(int32_t));
        if (st) w->start = st;
        int32_t *id = PyMem_Realloc(w->id, (size_t)cap * sizeof(int32_t));
        if (id) w->id = id;
        uint32_t *rv = PyMem_Realloc(w->rev, (size_t)cap * sizeof(uint32_t));
        if (rv) w->rev = rv;
        if (!sc || !st || !id || !rv) { PyErr_NoMemory(); return -1; }
        w->lat_cap = cap; w->rev_cap = cap;
    }
    return 0;
}

static int has_marker(const Encoder *e, const uint8_t *s, Py_ssize_t n) {
    const uint8_t *end = s + n;
    for (int f = 0; f < e->n_marker_firsts; f++) {
        uint8_t c = e->marker_firsts[f];
        for (const uint8_t *p = s; p < end && (p = memchr(p, c, (size_t)(end - p))) != NULL; p++)
            for (Py_ssize_t m = 0; m < e->n_markers; m++)
                if ((uint8_t)e->markers[m][0] == c && end - p >= e->marker_len[m] &&
                    memcmp(p, e->markers[m], (size_t)e->marker_len[m]) == 0)
                    return 1;
    }
    return 0;
}

static inline int utf8_len(uint8_t c) {
    return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

/* offer the node [pos, end) with `score` on top of `till` (strictly better replaces: the first wins a tie) */
#define RELAX(end_, id_, sc_) do { \
        double cand_ = (sc_) + till; \
        if (cand_ > score[end_]) { score[end_] = cand_; start[end_] = (int32_t)pos; lid[end_] = (id_); } \
    } while (0)

/* Encode one document (UTF-8, no added-token text checked yet). Returns 0 ok, 1 = needs the fallback (out
 * unchanged), -1 error. */
static int encode_text(const Encoder *e, const uint8_t *text, Py_ssize_t n, IdBuf *out, Work *w) {
    if (n == 0) return 0;
    if (e->n_markers && has_marker(e, text, n)) return 1;
    /* normalise: ' ' -> R, R in front unless the text starts with it */
    Py_ssize_t spaces = 0;
    for (const uint8_t *p = text; (p = memchr(p, ' ', (size_t)(text + n - p))) != NULL; p++) spaces++;
    Py_ssize_t cap = n + spaces * (e->repl_len - 1) + e->repl_len;
    if (work_reserve(w, cap, cap + 1) < 0) return -1;
    uint8_t *norm = w->norm, *q = norm;
    int starts_r = text[0] == ' ' || (n >= e->repl_len && memcmp(text, e->repl, (size_t)e->repl_len) == 0);
    if (e->prepend && !starts_r) { memcpy(q, e->repl, (size_t)e->repl_len); q += e->repl_len; }
    if (spaces == 0) {
        memcpy(q, text, (size_t)n); q += n;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (text[i] == ' ') { memcpy(q, e->repl, (size_t)e->repl_len); q += e->repl_len; }
            else *q++ = text[i];
        }
    }
    Py_ssize_t N = q - norm;
    double *score = w->score; int32_t *start = w->start, *lid = w->id;
    for (Py_ssize_t i = 1; i <= N; i++) score[i] = -INFINITY;
    score[0] = 0.0;
    const DANode *da = e->da;
    const Piece *piece = e->piece;
    for (Py_ssize_t pos = 0; pos < N;) {
        double till = score[pos];
        uint8_t c = norm[pos];
        int mblen = utf8_len(c);
        if (pos + mblen > N) mblen = (int)(N - pos); /* cannot happen for valid UTF-8 */
        uint32_t s;
        Py_ssize_t k;
        int single = 0;
        if (mblen < 4) {
            uint32_t cp = mblen == 1 ? c : mblen == 2 ? ((uint32_t)(c & 0x1F) << 6) | (norm[pos + 1] & 0x3F)
                : ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(norm[pos + 1] & 0x3F) << 6) | (norm[pos + 2] & 0x3F);
            s = e->first[cp];
            k = pos + mblen;
        } else {
            s = da_walk(e, 0, norm + pos, mblen);
            k = pos + mblen;
        }
        if (s) {
            if (da[s].base & TERM) { RELAX(k, piece[s].id, piece[s].score); single = 1; }
            while (k < N) {
                uint32_t t = (da[s].base & ~TERM) + norm[k];
                if (da[t].check != s) break;
                s = t; k++;
                if (da[s].base & TERM) RELAX(k, piece[s].id, piece[s].score);
            }
        }
        if (!single) {
            if (e->unk_id < 0) return 1; /* tokenizers: MissingUnkId */
            RELAX(pos + mblen, e->unk_id, e->unk_score);
        }
        pos += mblen;
    }
    /* the best path, from the end; ids written backwards into rev */
    uint32_t *rev = w->rev;
    Py_ssize_t r = 0, end = N;
    while (end > 0) {
        int32_t id = lid[end];
        if (id != e->unk_id || e->unk_id < 0) {
            rev[r++] = (uint32_t)id;
            end = start[end];
            continue;
        }
        Py_ssize_t span_end = end;
        while (end > 0 && lid[end] == e->unk_id) end = start[end];
        const uint8_t *sp = norm + end;
        Py_ssize_t len = span_end - end;
        int32_t whole = piece_id(e, sp, len);
        if (whole >= 0) { rev[r++] = (uint32_t)whole; continue; }
        int bytes = e->byte_fallback;
        for (Py_ssize_t i = 0; bytes && i < len; i++) bytes = e->byte_id[sp[i]] >= 0;
        if (bytes) {
            if (r + len > w->rev_cap) { /* more ids than bytes cannot happen: each id covers >= 1 byte */
                PyErr_SetString(PyExc_RuntimeError, "keizoku._unigram: id buffer overflow"); return -1;
            }
            for (Py_ssize_t i = len - 1; i >= 0; i--) rev[r++] = (uint32_t)e->byte_id[sp[i]];
        } else {
            rev[r++] = (uint32_t)e->unk_id;
        }
    }
    if (ids_reserve(out, r) < 0) return -1;
    uint32_t *o = out->p + out->n;
    for (Py_ssize_t i = 0; i < r; i++) o[i] = rev[r - 1 - i];
    out->n += r;
    return 0;
}

/* The UTF-8 of a str; NULL with no error set when it has none (lone surrogates: the fallback decides). */
static const char *utf8_of(PyObject *text, Py_ssize_t *n) {
    if (!PyUnicode_Check(text)) { PyErr_SetString(PyExc_TypeError, "texts must be str"); return NULL; }
    const char *s = PyUnicode_AsUTF8AndSize(text, n);
    if (!s && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) PyErr_Clear();
    return s;
}

/* ---- the type -------------------------------------------------------------------------------------------------- */

static void Encoder_dealloc(Encoder *e) {
    PyMem_Free(e->da); PyMem_Free(e->piece); PyMem_Free(e->first);
    for (Py_ssize_t m = 0; m < e->n_markers; m++) PyMem_Free(e->markers[m]);
    PyMem_Free(e->markers); PyMem_Free(e->marker_len);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* Encoder(pieces: list[str], scores: list[float], unk_id: int (-1: none), byte_fallback: bool,
 *         replacement: str, prepend: bool, markers: list[str]) */
static int Encoder_init(Encoder *e, PyObject *args, PyObject *kw) {
    PyObject *pieces, *scores, *markers, *repl;
    int unk_id, byte_fallback, prepend;
    if (!PyArg_ParseTuple(args, "O!O!ipUpO!", &PyList_Type, &pieces, &PyList_Type, &scores, &unk_id,
                          &byte_fallback, &repl, &prepend, &PyList_Type, &markers))
        return -1;
    if (e->da) { PyErr_SetString(PyExc_RuntimeError, "Encoder is already initialised"); return -1; }
    Py_ssize_t np = PyList_GET_SIZE(pieces);
    if (PyList_GET_SIZE(scores) != np || np == 0 || np >= INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "pieces and scores must be non-empty lists of the same length");
        return -1;
    }
    if (unk_id >= np || unk_id < -1) { PyErr_SetString(PyExc_ValueError, "unk_id out of range"); return -1; }
    Py_ssize_t rl; const char *rs = PyUnicode_AsUTF8AndSize(repl, &rl);
    if (!rs) return -1;
    if (PyUnicode_GET_LENGTH(repl) != 1 || rl > 4) {
        PyErr_SetString(PyExc_ValueError, "replacement must be one character"); return -1;
    }
    memcpy(e->repl, rs, (size_t)rl); e->repl_len = (int)rl;
    e->unk_id = unk_id; e->byte_fallback = byte_fallback; e->prepend = prepend;

    int rc = -1;
    Key *keys = PyMem_Malloc(sizeof(Key) * (size_t)np);
    double *sc = PyMem_Malloc(sizeof(double) * (size_t)np);
    Builder B = {0};
    B.head = B.tail = NONE;
    if (!keys || !sc) { PyErr_NoMemory(); goto done; }
    double min_score = INFINITY;
    size_t nk = 0;
    for (Py_ssize_t i = 0; i < np; i++) {
        Py_ssize_t len; const char *p = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(pieces, i), &len);
        if (!p) goto done;
        sc[i] = PyFloat_AsDouble(PyList_GET_ITEM(scores, i));
        if (sc[i] == -1.0 && PyErr_Occurred()) goto done;
        if (!isfinite(sc[i])) { PyErr_SetString(PyExc_ValueError, "scores must be finite"); goto done; }
        if (sc[i] < min_score) min_score = sc[i];
        if (len == 0) continue; /* never a match */
        if (len > 0xFFFF) { PyErr_SetString(PyExc_ValueError, "piece too long"); goto done; }
        keys[nk].p = (const uint8_t *)p; keys[nk].len = (uint32_t)len; keys[nk].id = (int32_t)i; nk++;
    }
    e->unk_score = min_score - UNK_PENALTY;
    qsort(keys, nk, sizeof(Key), key_cmp);
    {   /* equal pieces: keep the last id */
        size_t u = 0;
        for (size_t i = 0; i < nk; i++) {
            if (u && keys[u - 1].len == keys[i].len && memcmp(keys[u - 1].p, keys[i].p, keys[i].len) == 0)
                keys[u - 1] = keys[i];
            else
                keys[u++] = keys[i];
        }
        nk = u;
    }
    size_t total = 0;
    for (size_t i = 0; i < nk; i++) total += keys[i].len;
    if (builder_grow(&B, (uint32_t)(total + 1024 > (1u << 30) ? (1u << 30) : total + 1024)) < 0) goto done;
    builder_take(&B, 0, FREE_SLOT - 1); /* the root: checked against no node */
    if (nk) {
        if (builder_insert(&B, keys, 0, nk, 0, 0) < 0) goto done;
    }
    {   /* the final arrays: every base + 255 inside, unused slots FREE */
        uint32_t size = B.max_base + 256 + 1;
        uint32_t last_used = 0;
        for (uint32_t i = 0; i < B.cap; i++) if (B.da[i].check != FREE_SLOT) last_used = i;
        if (size < last_used + 1) size = last_used + 1;
        if (builder_grow(&B, size) < 0) goto done;
        e->da = PyMem_Malloc(sizeof(DANode) * size);
        e->piece = PyMem_Malloc(sizeof(Piece) * size);
        if (!e->da || !e->piece) { PyErr_NoMemory(); goto done; }
        memcpy(e->da, B.da, sizeof(DANode) * size);
        for (uint32_t i = 0; i < size; i++) {
            e->piece[i].id = B.id[i]; e->piece[i].unused = 0;
            e->piece[i].score = B.id[i] >= 0 ? sc[B.id[i]] : 0.0;
        }
        e->da_size = size;
    }
    e->first = PyMem_Calloc(0x10000, sizeof(uint32_t));
    if (!e->first) { PyErr_NoMemory(); goto done; }
    for (uint32_t cp = 0; cp < 0x10000; cp++) {
        if (cp >= 0xD800 && cp < 0xE000) continue;
        uint8_t u[3]; int w;
        if (cp < 0x80) { u[0] = (uint8_t)cp; w = 1; }
        else if (cp < 0x800) { u[0] = 0xC0 | (cp >> 6); u[1] = 0x80 | (cp & 0x3F); w = 2; }
        else { u[0] = 0xE0 | (cp >> 12); u[1] = 0x80 | ((cp >> 6) & 0x3F); u[2] = 0x80 | (cp & 0x3F); w = 3; }
        e->first[cp] = da_walk(e, 0, u, w);
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        e->byte_id[b] = piece_id(e, (const uint8_t *)name, 6);
    }
    {
        Py_ssize_t nm = PyList_GET_SIZE(markers);
        e->markers = PyMem_Calloc((size_t)(nm ? nm : 1), sizeof(char *));
        e->marker_len = PyMem_Calloc((size_t)(nm ? nm : 1), sizeof(Py_ssize_t));
        if (!e->markers || !e->marker_len) { PyErr_NoMemory(); goto done; }
        for (Py_ssize_t m = 0; m < nm; m++) {
            PyObject *item = PyList_GET_ITEM(markers, m);
            if (!PyUnicode_Check(item)) { PyErr_SetString(PyExc_TypeError, "markers must be str"); goto done; }
            Py_ssize_t len; const char *p = PyUnicode_AsUTF8AndSize(item, &len);
            if (!p) goto done;
            if (len == 0) continue;
            char *copy = PyMem_Malloc((size_t)len);
            if (!copy) { PyErr_NoMemory(); goto done; }
            memcpy(copy, p, (size_t)len);
            e->markers[e->n_markers] = copy; e->marker_len[e->n_markers] = len; e->n_markers++;
            int seen = 0;
            for (int f = 0; f < e->n_marker_firsts; f++) seen |= e->marker_firsts[f] == (uint8_t)p[0];
            if (!seen) e->marker_firsts[e->n_marker_firsts++] = (uint8_t)p[0];
        }
    }
    rc = 0;
done:
    PyMem_Free(keys); PyMem_Free(sc);
    PyMem_Free(B.da); PyMem_Free(B.id); PyMem_Free(B.nxt); PyMem_Free(B.prv);
    return rc;
}

/* encode(text) -> list[int] | None (None: the document needs the fallback) */
static PyObject *Encoder_encode(Encoder *e, PyObject *text) {
    if (!e->da) { PyErr_SetString(PyExc_RuntimeError, "Encoder is not initialised"); return NULL; }
    Py_ssize_t n; const char *s = utf8_of(text, &n);
    if (!s) { if (PyErr_Occurred()) return NULL; Py_RETURN_NONE; }
    IdBuf out = {0}; Work w = {0};
    int rc = encode_text(e, (const uint8_t *)s, n, &out, &w);
    work_free(&w);
    if (rc < 0) { PyMem_Free(out.p); return NULL; }
    if (rc == 1) { PyMem_Free(out.p); Py_RETURN_NONE; }
    PyObject *list = PyList_New(out.n);
    for (Py_ssize_t i = 0; list && i < out.n; i++) PyList_SET_ITEM(list, i, PyLong_FromUnsignedLong(out.p[i]));
    PyMem_Free(out.p);
    return list;
}

/* encode_pack(texts, bos, eod, fallback) -> (ids: bytes of uint32, lengths: bytes of int32)
 * Per document: [bos] + ids(text); EOD appended when that is non-empty (Megatron's rule). bos/eod < 0
 * mean none. fallback(text) -> list[int] encodes the documents this module hands back. */
static PyObject *Encoder_encode_pack(Encoder *e, PyObject *args) {
    PyObject *texts, *fallback; long bos, eod;
    if (!PyArg_ParseTuple(args, "O!llO", &PyList_Type, &texts, &bos, &eod, &fallback)) return NULL;
    if (!e->da) { PyErr_SetString(PyExc_RuntimeError, "Encoder is not initialised"); return NULL; }
    Py_ssize_t nd = PyList_GET_SIZE(texts);
    IdBuf out = {0}; Work w = {0};
    PyObject *lengths = PyBytes_FromStringAndSize(NULL, nd * 4), *result = NULL;
    if (!lengths) return NULL;
    int32_t *lens = (int32_t *)PyBytes_AS_STRING(lengths);
    for (Py_ssize_t d = 0; d < nd; d++) {
        PyObject *t = PyList_GET_ITEM(texts, d);
        Py_ssize_t n; const char *s = utf8_of(t, &n);
        if (!s && PyErr_Occurred()) goto fail;
        Py_ssize_t before = out.n;
        if (bos >= 0 && ids_push(&out, (uint32_t)bos) < 0) goto fail;
        int rc = s ? encode_text(e, (const uint8_t *)s, n, &out, &w) : 1;
        if (rc < 0) goto fail;
        if (rc == 1) {
            PyObject *ids = PyObject_CallOneArg(fallback, t);
            if (!ids) goto fail;
            PyObject *seq = PySequence_Fast(ids, "fallback must return a sequence of ints");
            Py_DECREF(ids);
            if (!seq) goto fail;
            for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq); k++) {
                unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, k));
                if (PyErr_Occurred() || ids_push(&out, (uint32_t)v) < 0) { Py_DECREF(seq); goto fail; }
            }
            Py_DECREF(seq);
        }
        if (out.n > before && eod >= 0 && ids_push(&out, (uint32_t)eod) < 0) goto fail;
        lens[d] = (int32_t)(out.n - before);
    }
    {
        PyObject *ids = PyBytes_FromStringAndSize((const char *)out.p, out.n * 4);
        if (ids) { result = PyTuple_Pack(2, ids, lengths); Py_DECREF(ids); }
    }
fail:
    PyMem_Free(out.p); work_free(&w);
    Py_DECREF(lengths);
    return result;
}

/* stats() -> dict: the trie's size (for tests and benchmarks) */
static PyObject *Encoder_stats(Encoder *e, PyObject *Py_UNUSED(ignored)) {
    uint32_t used = 0;
    for (uint32_t i = 0; i < e->da_size; i++) used += e->da[i].check != FREE_SLOT;
    return Py_BuildValue("{s:I,s:I,s:d,s:i}", "slots", e->da_size, "nodes", used, "unk_score", e->unk_score,
                         "markers", (int)e->n_markers);
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O, "encode(text) -> list[int] | None"},
    {"encode_pack", (PyCFunction)Encoder_encode_pack, METH_VARARGS,
     "encode_pack(texts, bos, eod, fallback) -> (uint32 ids bytes, int32 lengths bytes)"},
    {"stats", (PyCFunction)Encoder_stats, METH_NOARGS, "stats() -> dict"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keizoku._unigram.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
    .tp_doc = "Exact Unigram encoding (Metaspace, byte fallback) as Hugging Face tokenizers does it.",
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "keizoku._unigram", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__unigram(void) {
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) { Py_DECREF(&EncoderType); Py_DECREF(m); return NULL; }
    return m;
}
