/* keizoku._bpe: exact byte-level BPE for the Llama-3 pre-tokenizer pattern, in C.
 *
 * Why: tiktoken spends most of its time per pre-token (a Vec per piece, Python ints for every id);
 * this does the same algorithm with no allocation per piece and packs ids straight into the output
 * buffer, which makes `keizoku tokenize` about twice as fast on Japanese text.
 *
 * Exactness: ids equal tiktoken's (and so Hugging Face's, which keizoku verifies) for text whose
 * characters all have a Unicode category in Python's database. The pre-tokenizer below is a hand
 * translation of the Llama-3 split regex
 *
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*
 *   |\s*[\r\n]+|\s+(?!\S)|\s+
 *
 * (alternatives tried in order at each position, as a backtracking engine does). The character classes
 * come from a table built in Python from `unicodedata` (L*, N*, White_Space). A document containing an
 * unassigned code point (whose class may differ between Unicode versions), a long s (U+017F, which
 * case-folds to 's'), or the common prefix of the tokenizer's added tokens is handed to a Python
 * fallback instead, which uses tiktoken / Hugging Face.
 *
 * BPE is tiktoken's `_byte_pair_merge`: repeatedly merge the adjacent pair whose concatenation has the
 * lowest rank (leftmost on ties) until no pair is in the vocabulary.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CL_L 1
#define CL_N 2
#define CL_WS 4
#define CL_NL 8       /* \r or \n */
#define CL_FALLBACK 16 /* unassigned: hand the document to the fallback */
#define NO_RANK UINT32_MAX

/* One hash-table slot: 16 bytes. Keys of up to 8 bytes (most lookups) live in `key`, so a probe
 * touches one cache line and no arena; longer keys compare `key` (their first 8 bytes) and then the
 * arena at `off`. */
typedef struct {
    uint64_t key;   /* first min(len, 8) bytes, zero padded */
    uint32_t rank;  /* NO_RANK marks an empty slot */
    uint32_t len_off; /* len (8 bits) << 24 | offset of the bytes in arena (24 bits) */
} Slot;

/* A multi-byte character that is one token, and the neighbouring bytes next to which BPE may start from that
 * token instead of the character's bytes.
 *
 * Why: in Japanese text nearly every character is one token, and most merges of byte-level BPE (two a
 * character) only rebuild characters; starting from the characters cuts merges and lookups several times.
 *
 * Exactness. Let c have bytes β and token T of rank r. In the bytes' run, c's two internal merges (ranks ≤ r)
 * stay available until taken, so a merge that joins some of c's bytes to a neighbour's is taken first only if
 * its token — neighbour bytes + a proper prefix of β, or a proper suffix of β + neighbour bytes — ranks below
 * r. In the characters' run, T may merge with a neighbour earlier than in the bytes' run; that changes nothing
 * if the token — neighbour bytes + β, or β + neighbour bytes — ranks above r, because until T forms in the
 * bytes' run every merge taken there ranks below r. So when no such token ranks below r, every merge not
 * internal to c is taken in the same order in both runs. `left`/`right` mark, per value of the byte before
 * (after) c, whether a token ending (starting) with that byte followed (preceded) by a proper prefix (suffix)
 * of β or by β itself ranks below r; c starts whole when neither its neighbour byte is marked. (Tokens with
 * other bytes than the text's count too: the check is sufficient, not necessary; 96% of the Japanese
 * characters of ja_sample start whole with Llama-3.) Checked against tiktoken in tests/test_tokenize.py. */
typedef struct {
    uint32_t token;
    uint64_t left[4];   /* bit b: a token [.. b] + (proper prefix of β, or β) ranks below T */
    uint64_t right[4];  /* bit b: a token (proper suffix of β, or β) + [b ..] ranks below T */
} CharInfo;

/* CharInfo as encoding reads it: 8 bytes, the masks shared (most characters have none; 3,957 characters of
 * Llama-3 share a few hundred), so that the table stays in L1/L2 (with the masks inline it did not). */
typedef struct {
    uint32_t token;
    uint16_t left, right;  /* index in masks; 0: no byte marked */
} CharStart;

static inline int marked(const uint64_t *mask, uint8_t b) { return mask[b >> 6] >> (b & 63) & 1; }

typedef struct {
    PyObject_HEAD
    uint8_t *arena;     /* bytes of all tokens */
    Slot *slots;        /* open addressing */
    uint32_t mask;
    uint32_t byte_rank[256];   /* rank of each single byte */
    uint32_t *pair_rank;       /* rank of each two-byte sequence (65,536 entries: stays in L2) */
    uint64_t *filter;          /* a blocked Bloom filter of the tokens: most failed lookups stop here, in L2 */
    uint8_t *cls;       /* class per code point, 0x110000 entries */
    char *marker;       /* documents containing this (UTF-8) go to the fallback; may be empty */
    Py_ssize_t marker_len;
    uint16_t *char_index;      /* BMP code point -> 1 + its CharStart, 0 when it starts from its bytes */
    CharStart *chars;
    uint64_t (*masks)[4];      /* the distinct CharInfo masks; masks[0] marks nothing */
    uint8_t *longest;          /* per CharStart: the longest token starting with the character (255: longer) */
    Py_ssize_t char_count;     /* characters that may start whole */
    uint64_t *word_bits;       /* bit t: token t is made of such characters only (a "word") */
    uint64_t *word_pairs;      /* each split of a word into two words: entry(left, right, rank), see word_pair_rank */
    uint32_t word_pairs_mask;
    uint32_t word_limit;       /* tokens below this id may be words (ids fit the entries' 20 bits) */
} Encoder;

static inline uint64_t load8(const uint8_t *p, Py_ssize_t n) {
    uint64_t k = 0;
    memcpy(&k, p, (size_t)(n < 8 ? n : 8));
    return k;
}

static inline uint64_t hash_key(uint64_t k8, const uint8_t *p, Py_ssize_t n) {
    uint64_t h = (k8 ^ ((uint64_t)n << 56)) * 0x9E3779B97F4A7C15ULL;
    for (Py_ssize_t i = 8; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ULL;
    return h ^ (h >> 32);
}

/* 128 KB, two bits a token in one 64-bit word: ~5% false positives on a 128k vocabulary, and small enough to
 * stay in L2 beside the text and the character tables (a 512 KB filter of one bit a token missed L2). */
#define FILTER_WORDS (1u << 14)

static inline uint64_t filter_bits(uint64_t h) { return 1ULL << (h >> 52 & 63) | 1ULL << (h >> 58); }

static inline uint32_t lookup(const Encoder *e, const uint8_t *p, Py_ssize_t n) {
    if (n > 255) return NO_RANK; /* no token is that long */
    uint64_t k8 = load8(p, n);
    uint64_t h = hash_key(k8, p, n);
    uint64_t bits = filter_bits(h);
    if ((e->filter[(h >> 32) & (FILTER_WORDS - 1)] & bits) != bits) return NO_RANK;
    for (uint32_t s = (uint32_t)h & e->mask;; s = (s + 1) & e->mask) {
        const Slot *sl = &e->slots[s];
        if (sl->rank == NO_RANK) return NO_RANK;
        if (sl->key == k8 && (sl->len_off >> 24) == (uint32_t)n &&
            (n <= 8 || memcmp(e->arena + (sl->len_off & 0xFFFFFF) + 8, p + 8, (size_t)n - 8) == 0))
            return sl->rank;
    }
}

/* Words: tokens made only of characters that may start whole (CharInfo). Once a piece starts from characters,
 * most merges join two words, and the pair's rank is what `lookup` would give for their bytes: a word + a word
 * is a token only if it is a word with a split there, so this table of every split of every word into two words
 * (a few tens of thousands; a few hundred KB) answers those exactly, without hashing bytes or touching the
 * vocabulary's hash table. */
static inline int is_word(const Encoder *e, uint32_t t) {
    return t < e->word_limit && (e->word_bits[t >> 6] >> (t & 63) & 1);
}

static inline uint64_t word_key(uint32_t left, uint32_t right) { return ((uint64_t)left << 20 | right) + 1; }

static inline uint32_t word_slot(const Encoder *e, uint64_t key) {
    return (uint32_t)((key * 0x9E3779B97F4A7C15ULL) >> 40) & e->word_pairs_mask;
}

/* entries: key << 20 | rank (key < 2^40, rank < 2^20); 0 is empty */
static inline uint32_t word_pair_rank(const Encoder *e, uint32_t left, uint32_t right) {
    uint64_t key = word_key(left, right);
    for (uint32_t s = word_slot(e, key);; s = (s + 1) & e->word_pairs_mask) {
        uint64_t v = e->word_pairs[s];
        if (!v) return NO_RANK;
        if (v >> 20 == key) return (uint32_t)(v & 0xFFFFF);
    }
}

/* the rank of parts x and y merged: the words' table when both are words, else the vocabulary */
static inline uint32_t pair_rank_of(const Encoder *e, uint32_t tx, uint32_t ty, const uint8_t *p, Py_ssize_t n) {
    if (e->word_pairs && is_word(e, tx) && is_word(e, ty)) return word_pair_rank(e, tx, ty);
    return lookup(e, p, n);
}

/* decode one UTF-8 code point at s[i] (input is valid UTF-8 from Python); returns its length */
static inline int utf8_next(const uint8_t *s, Py_ssize_t i, uint32_t *cp) {
    uint8_t c = s[i];
    if (c < 0x80) { *cp = c; return 1; }
    if (c < 0xE0) { *cp = ((uint32_t)(c & 0x1F) << 6) | (s[i + 1] & 0x3F); return 2; }
    if (c < 0xF0) { *cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F); return 3; }
    *cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) | ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
    return 4;
}

typedef struct { uint32_t *p; Py_ssize_t n, cap; } IdBuf;

static int ids_push(IdBuf *b, uint32_t v) {
    if (b->n == b->cap) {
        Py_ssize_t cap = b->cap ? b->cap * 2 : 4096;
        uint32_t *p = PyMem_Realloc(b->p, (size_t)cap * sizeof(uint32_t));
        if (!p) { PyErr_NoMemory(); return -1; }
        b->p = p; b->cap = cap;
    }
    b->p[b->n++] = v;
    return 0;
}

typedef struct { uint32_t *start, *rank, *tok, *next, *prev; uint64_t *heap; Py_ssize_t cap; } Parts;

static void parts_free(Parts *pt) {
    PyMem_Free(pt->start); PyMem_Free(pt->rank); PyMem_Free(pt->tok); PyMem_Free(pt->next); PyMem_Free(pt->prev);
    PyMem_Free(pt->heap);
}

static int parts_reserve(Parts *pt, Py_ssize_t n) {
    if (pt->cap >= n + 1) return 0;
    Py_ssize_t cap = n + 1 > 256 ? n + 1 : 256;
    parts_free(pt);
    memset(pt, 0, sizeof(*pt));
    pt->start = PyMem_Malloc((size_t)cap * sizeof(uint32_t));
    pt->rank = PyMem_Malloc((size_t)cap * sizeof(uint32_t));
    pt->tok = PyMem_Malloc((size_t)cap * sizeof(uint32_t));
    pt->next = PyMem_Malloc((size_t)cap * sizeof(uint32_t));
    pt->prev = PyMem_Malloc((size_t)cap * sizeof(uint32_t));
    pt->heap = PyMem_Malloc((size_t)cap * 3 * sizeof(uint64_t)); /* m pushes, then two a merge */
    if (!pt->start || !pt->rank || !pt->tok || !pt->next || !pt->prev || !pt->heap) {
        parts_free(pt); memset(pt, 0, sizeof(*pt)); PyErr_NoMemory(); return -1;
    }
    pt->cap = cap;
    return 0;
}

/* the lowest of rk[0..m) (NO_RANK when none); a loop the compiler vectorises */
__attribute__((target_clones("avx2", "default")))
static uint32_t min_rank(const uint32_t *rk, Py_ssize_t m) {
    uint32_t best = NO_RANK;
    for (Py_ssize_t k = 0; k < m; k++) best = rk[k] < best ? rk[k] : best;
    return best;
}

/* Pieces longer than this many parts find the lowest rank with a heap instead of a scan. */
#define HEAP_PARTS 192

static inline void heap_push(uint64_t *h, Py_ssize_t *len, uint64_t v) {
    Py_ssize_t i = (*len)++;
    while (i > 0) {
        Py_ssize_t parent = (i - 1) / 2;
        if (h[parent] <= v) break;
        h[i] = h[parent]; i = parent;
    }
    h[i] = v;
}

static inline uint64_t heap_pop(uint64_t *h, Py_ssize_t *len) {
    uint64_t top = h[0], v = h[--(*len)];
    Py_ssize_t i = 0, n = *len;
    for (;;) {
        Py_ssize_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c]; i = c;
    }
    if (n) h[i] = v;
    return top;
}

/* BPE-encode piece s[0..n) into out: tiktoken's _byte_pair_merge (merge the adjacent pair whose concatenation
 * has the lowest rank, leftmost on ties, until none is a token), starting from whole characters where that is
 * exact (CharInfo). Parts live in fixed arrays linked by next/prev; a merged-away part gets rank NO_RANK. */
static int encode_piece(const Encoder *e, const uint8_t *s, Py_ssize_t n, IdBuf *out, Parts *pt) {
    /* the whole piece, if it is a token (Hugging Face's ignore_merges); most Japanese pieces are longer than any
     * token starting with their first character, which this tells without a lookup */
    uint32_t ci0 = e->char_index && n > 3 && s[0] >= 0xE0 && s[0] < 0xF0 ?
        e->char_index[((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F)] : 0;
    if (!ci0 || n <= e->longest[ci0 - 1]) {
        uint32_t whole = lookup(e, s, n);
        if (whole != NO_RANK) return ids_push(out, whole);
    }
    if (parts_reserve(pt, n) < 0) return -1;
    uint32_t *st = pt->start, *rk = pt->rank, *tk = pt->tok, *nx = pt->next, *pv = pt->prev;
    /* the starting parts: bytes, or characters that may start whole */
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n;) {
        uint8_t c = s[i];
        if (c >= 0xC2 && c < 0xF0 && e->char_index) {
            int w = c < 0xE0 ? 2 : 3;
            if (i + w <= n) {
                uint32_t cp = w == 2 ? ((uint32_t)(c & 0x1F) << 6) | (s[i + 1] & 0x3F)
                                     : ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
                uint16_t ci = e->char_index[cp];
                if (ci) {
                    const CharStart *cs = &e->chars[ci - 1];
                    int safe = !(i > 0 && cs->left && marked(e->masks[cs->left], s[i - 1])) &&
                               !(i + w < n && cs->right && marked(e->masks[cs->right], s[i + w]));
                    if (safe) { st[m] = (uint32_t)i; tk[m++] = cs->token; i += w; continue; }
                }
            }
        }
        st[m] = (uint32_t)i; tk[m++] = e->byte_rank[c]; i++;
    }
    st[m] = (uint32_t)n;
    Py_ssize_t live = 0; /* pairs that are tokens: none left, no scan needed (often none at all in a piece) */
    for (Py_ssize_t k = 0; k < m; k++) {
        nx[k] = (uint32_t)(k + 1); pv[k] = (uint32_t)(k - 1);
        if (k + 1 == m) rk[k] = NO_RANK;
        else if (st[k + 2] - st[k] == 2) rk[k] = e->pair_rank[(uint32_t)s[st[k]] << 8 | s[st[k] + 1]];
        else rk[k] = pair_rank_of(e, tk[k], tk[k + 1], s + st[k], st[k + 2] - st[k]);
        live += rk[k] != NO_RANK;
    }
    uint64_t *heap = pt->heap;
    Py_ssize_t hlen = 0;
    int use_heap = m > HEAP_PARTS;
    if (use_heap)
        for (Py_ssize_t k = 0; k < m; k++)
            if (rk[k] != NO_RANK) heap_push(heap, &hlen, (uint64_t)rk[k] << 32 | (uint64_t)k);
    for (;;) {
        uint32_t best; Py_ssize_t a;
        if (use_heap) {
            if (!hlen) break;
            uint64_t top = heap_pop(heap, &hlen);
            best = (uint32_t)(top >> 32); a = (Py_ssize_t)(uint32_t)top;
            if (rk[a] != best) continue; /* stale: this part merged or its pair changed since */
        } else {
            if (!live) break;
            best = min_rank(rk, m);
            a = 0;
            while (rk[a] != best) a++;
        }
        /* merge part a with the next one, b */
        uint32_t b = nx[a], c = nx[b];
        live -= (rk[a] != NO_RANK) + (rk[b] != NO_RANK);
        tk[a] = best; rk[b] = NO_RANK; nx[a] = c;
        if (c < m) pv[c] = (uint32_t)a;
        uint32_t end = st[c];                              /* st[m] = n */
        rk[a] = c < m ? pair_rank_of(e, best, tk[c], s + st[a], st[nx[c]] - st[a]) : NO_RANK;
        live += rk[a] != NO_RANK;
        if (use_heap && rk[a] != NO_RANK) heap_push(heap, &hlen, (uint64_t)rk[a] << 32 | (uint64_t)a);
        if (a > 0) {
            uint32_t p = pv[a];
            live -= rk[p] != NO_RANK;
            rk[p] = pair_rank_of(e, tk[p], best, s + st[p], end - st[p]);
            live += rk[p] != NO_RANK;
            if (use_heap && rk[p] != NO_RANK) heap_push(heap, &hlen, (uint64_t)rk[p] << 32 | (uint64_t)p);
        }
    }
    for (Py_ssize_t k = 0; k < m; k = nx[k])
        if (ids_push(out, tk[k]) < 0) return -1;
    return 0;
}

static inline uint8_t cls_at(const Encoder *e, const uint8_t *s, Py_ssize_t i, Py_ssize_t n, uint32_t *cp, int *w) {
    if (i >= n) { *w = 0; *cp = 0; return 0; }
    *w = utf8_next(s, i, cp);
    return e->cls[*cp];
}

/* Encode one document. Returns 0 ok, 1 = needs the fallback (out unchanged), -1 error. */
static int encode_text(const Encoder *e, const uint8_t *s, Py_ssize_t n, IdBuf *out, Parts *pt) {
    if (e->marker_len && n >= e->marker_len) {
        /* memchr for the first byte, then compare: several times faster than memmem on text that rarely has it */
        const uint8_t *p = s, *end = s + n - e->marker_len + 1;
        while (p < end && (p = memchr(p, (uint8_t)e->marker[0], (size_t)(end - p))) != NULL) {
            if (memcmp(p, e->marker, (size_t)e->marker_len) == 0) return 1;
            p++;
        }
    }
    Py_ssize_t start_n = out->n;
    Py_ssize_t i = 0;
    while (i < n) {
        uint32_t cp, cp2; int w, w2;
        uint8_t c = cls_at(e, s, i, n, &cp, &w);
        if (c & CL_FALLBACK) { out->n = start_n; return 1; }
        Py_ssize_t j = -1;
        /* 1: (?i:'s|'t|'re|'ve|'m|'ll|'d) */
        if (cp == '\'' && i + 1 < n) {
            uint8_t a = s[i + 1] | 0x20, b = i + 2 < n ? (s[i + 2] | 0x20) : 0;
            if (s[i + 1] == 0xC5 && i + 2 < n && s[i + 2] == 0xBF) { out->n = start_n; return 1; } /* U+017F */
            if (a == 's' || a == 't' || a == 'm' || a == 'd') j = i + 2;
            else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) j = i + 3;
        }
        /* 2: [^\r\n\p{L}\p{N}]?\p{L}+ */
        if (j < 0) {
            Py_ssize_t k = -1;
            if (c & CL_L) k = i;
            else if (!(c & (CL_NL | CL_L | CL_N))) {
                uint8_t c2 = cls_at(e, s, i + w, n, &cp2, &w2);
                if (c2 & CL_L) k = i + w;
            }
            if (k >= 0) {
                while (k < n) {
                    uint8_t ck = cls_at(e, s, k, n, &cp2, &w2);
                    if (ck & CL_FALLBACK) { out->n = start_n; return 1; }
                    if (!(ck & CL_L)) break;
                    k += w2;
                }
                j = k;
            }
        }
        /* 3: \p{N}{1,3} */
        if (j < 0 && (c & CL_N)) {
            Py_ssize_t k = i; int cnt = 0;
            while (k < n && cnt < 3) {
                uint8_t ck = cls_at(e, s, k, n, &cp2, &w2);
                if (!(ck & CL_N)) break;
                k += w2; cnt++;
            }
            j = k;
        }
        /* 4: " ?[^\s\p{L}\p{N}]+[\r\n]*" */
        if (j < 0) {
            Py_ssize_t k = i;
            if (cp == ' ') {
                uint8_t c2 = cls_at(e, s, i + 1, n, &cp2, &w2);
                if (i + 1 < n && !(c2 & (CL_WS | CL_L | CL_N))) k = i + 1;
            }
            uint8_t ck = cls_at(e, s, k, n, &cp2, &w2);
            if (k < n && !(ck & (CL_WS | CL_L | CL_N))) {
                while (k < n) {
                    ck = cls_at(e, s, k, n, &cp2, &w2);
                    if (ck & CL_FALLBACK) { out->n = start_n; return 1; }
                    if (ck & (CL_WS | CL_L | CL_N)) break;
                    k += w2;
                }
                while (k < n && (s[k] == '\r' || s[k] == '\n')) k++;
                j = k;
            }
        }
        /* 5, 6, 7: whitespace runs */
        if (j < 0 && (c & CL_WS)) {
            Py_ssize_t k = i, last_nl_end = -1, prev = i;
            while (k < n) {
                uint8_t ck = cls_at(e, s, k, n, &cp2, &w2);
                if (!(ck & CL_WS)) break;
                prev = k;
                k += w2;
                if (ck & CL_NL) last_nl_end = k;
            }
            if (last_nl_end > 0) j = last_nl_end;          /* \s*[\r\n]+ */
            else if (k == n || prev == i) j = k;           /* \s+(?!\S) at the end, or \s+ of one char */
            else j = prev;                                 /* \s+(?!\S): the run but its last char */
        }
        if (j < 0) { /* cannot happen for valid input; be safe */
            PyErr_SetString(PyExc_RuntimeError, "keizoku._bpe: pre-tokenizer made no progress");
            return -1;
        }
        if (encode_piece(e, s + i, j - i, out, pt) < 0) return -1;
        i = j;
    }
    return 0;
}

static void Encoder_dealloc(Encoder *e) {
    PyMem_Free(e->arena); PyMem_Free(e->slots); PyMem_Free(e->cls); PyMem_Free(e->marker); PyMem_Free(e->pair_rank); PyMem_Free(e->filter);
    PyMem_Free(e->char_index); PyMem_Free(e->chars); PyMem_Free(e->masks); PyMem_Free(e->longest); PyMem_Free(e->word_bits); PyMem_Free(e->word_pairs);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static inline int is_cont(uint8_t b) { return (b & 0xC0) == 0x80; }

/* decode the single UTF-8 character of BMP that is exactly t[0..n); -1 when t is not one */
static int32_t one_bmp_char(const uint8_t *t, Py_ssize_t n) {
    if (n == 2 && t[0] >= 0xC2 && t[0] < 0xE0 && is_cont(t[1])) return ((t[0] & 0x1F) << 6) | (t[1] & 0x3F);
    if (n == 3 && t[0] >= 0xE0 && t[0] < 0xF0 && is_cont(t[1]) && is_cont(t[2])) {
        int32_t cp = ((t[0] & 0x0F) << 12) | ((t[1] & 0x3F) << 6) | (t[2] & 0x3F);
        return cp >= 0x800 && (cp < 0xD800 || cp >= 0xE000) ? cp : -1;
    }
    return -1;
}

/* The length of the first character of t[0..n) if it is a BMP character with a CharInfo, else 0. */
static int word_char(const Encoder *e, const uint8_t *t, Py_ssize_t n) {
    for (int w = 2; w <= 3 && w <= n; w++) {
        int32_t cp = one_bmp_char(t, w);
        if (cp >= 0) return e->char_index[cp] ? w : 0;
    }
    return 0;
}

/* word_bits and word_pairs (see is_word), from the vocabulary and char_index */
static int build_word_pairs(Encoder *e) {
    uint32_t limit = 0;
    for (uint32_t s = 0; s <= e->mask; s++)
        if (e->slots[s].rank != NO_RANK && e->slots[s].rank >= limit) limit = e->slots[s].rank + 1;
    if (limit > (1u << 20)) return 0; /* ids do not fit the entries: no table, every pair through lookup */
    e->word_limit = limit;
    e->word_bits = PyMem_Calloc((limit + 63) / 64, sizeof(uint64_t));
    if (!e->word_bits) { PyErr_NoMemory(); return -1; }
    uint32_t pairs = 0;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            uint32_t cap = 64; while (cap < 2 * pairs) cap <<= 1;
            e->word_pairs = PyMem_Calloc(cap, sizeof(uint64_t));
            if (!e->word_pairs) { PyErr_NoMemory(); return -1; }
            e->word_pairs_mask = cap - 1;
        }
        for (uint32_t s = 0; s <= e->mask; s++) {
            const Slot *sl = &e->slots[s];
            if (sl->rank == NO_RANK) continue;
            const uint8_t *t = e->arena + (sl->len_off & 0xFFFFFF);
            Py_ssize_t len = sl->len_off >> 24, k = 0;
            int w;
            while (k < len && (w = word_char(e, t + k, len - k)) > 0) k += w;
            if (k < len) continue; /* not a word */
            if (pass == 0) e->word_bits[sl->rank >> 6] |= 1ULL << (sl->rank & 63);
            for (k = word_char(e, t, len); k < len; k += word_char(e, t + k, len - k)) {
                uint32_t left = lookup(e, t, k), right = lookup(e, t + k, len - k);
                if (left == NO_RANK || right == NO_RANK) continue;
                if (pass == 0) { pairs++; continue; }
                uint64_t key = word_key(left, right);
                uint32_t h = word_slot(e, key);
                while (e->word_pairs[h]) h = (h + 1) & e->word_pairs_mask;
                e->word_pairs[h] = key << 20 | sl->rank;
            }
        }
    }
    return 0;
}

/* The CharInfo of every BMP character that is one token (see CharInfo). */
static int build_char_table(Encoder *e) {
    CharInfo *full = NULL;
    /* lowest rank + 1 (0: none) of a token: [a byte b] + proper prefix p of a character ... (left), and
     * proper suffix q of a character + [b ...] (right); p is a lead byte 0xC2..0xEF alone or with one
     * continuation byte, q one or two continuation bytes */
    enum { LEADS = 0xF0 - 0xC2 };
    uint32_t *left1 = PyMem_Calloc((size_t)LEADS * 256, 4), *left2 = PyMem_Calloc((size_t)LEADS * 64 * 256, 4);
    uint32_t *right1 = PyMem_Calloc((size_t)64 * 256, 4), *right2 = PyMem_Calloc((size_t)64 * 64 * 256, 4);
    int rc = -1;
    if (!left1 || !left2 || !right1 || !right2) { PyErr_NoMemory(); goto done; }
#define LOWER(slot, r) do { uint32_t *x_ = (slot); if (!*x_ || *x_ > (r) + 1) *x_ = (r) + 1; } while (0)
    for (uint32_t s = 0; s <= e->mask; s++) {
        const Slot *sl = &e->slots[s];
        if (sl->rank == NO_RANK) continue;
        const uint8_t *t = e->arena + (sl->len_off & 0xFFFFFF);
        Py_ssize_t len = sl->len_off >> 24;
        uint32_t r = sl->rank;
        for (Py_ssize_t k = 1; k < len; k++) {
            Py_ssize_t plen = len - k; /* t = t[:k] + p */
            uint8_t p0 = t[k];
            if (p0 >= 0xC2 && p0 < 0xF0) {
                if (plen == 1) LOWER(&left1[(p0 - 0xC2) * 256 + t[k - 1]], r);
                else if (plen == 2 && p0 >= 0xE0 && is_cont(t[k + 1]))
                    LOWER(&left2[((p0 - 0xC2) * 64 + (t[k + 1] & 0x3F)) * 256 + t[k - 1]], r);
            }
            /* t = q + t[k:] */
            if (k == 1 && is_cont(t[0])) LOWER(&right1[(t[0] & 0x3F) * 256 + t[1]], r);
            else if (k == 2 && is_cont(t[0]) && is_cont(t[1]))
                LOWER(&right2[((t[0] & 0x3F) * 64 + (t[1] & 0x3F)) * 256 + t[2]], r);
        }
    }
#undef LOWER
    e->char_index = PyMem_Calloc(0x10000, sizeof(uint16_t));
    full = PyMem_Calloc(0xFFFF, sizeof(CharInfo));
    if (!e->char_index || !full) { PyErr_NoMemory(); goto done; }
    uint32_t count = 0;
    for (uint32_t cp = 0x80; cp < 0x10000 && count < 0xFFFF; cp++) {
        if (cp >= 0xD800 && cp < 0xE000) continue;
        uint8_t u[3]; int w;
        if (cp < 0x800) { u[0] = 0xC0 | (cp >> 6); u[1] = 0x80 | (cp & 0x3F); w = 2; }
        else { u[0] = 0xE0 | (cp >> 12); u[1] = 0x80 | ((cp >> 6) & 0x3F); u[2] = 0x80 | (cp & 0x3F); w = 3; }
        uint32_t tok = lookup(e, u, w);
        if (tok == NO_RANK) continue;
        CharInfo *inf = &full[count];
        inf->token = tok;
        const uint32_t *rows_l[2] = {&left1[(u[0] - 0xC2) * 256], w == 3 ? &left2[((u[0] - 0xC2) * 64 + (u[1] & 0x3F)) * 256] : NULL};
        const uint32_t *rows_r[2] = {w == 3 ? &right2[((u[1] & 0x3F) * 64 + (u[2] & 0x3F)) * 256] : &right1[(u[1] & 0x3F) * 256],
                                     w == 3 ? &right1[(u[2] & 0x3F) * 256] : NULL};
        for (int b = 0; b < 256; b++)
            for (int j = 0; j < 2; j++) {
                if (rows_l[j] && rows_l[j][b] && rows_l[j][b] - 1 < tok) inf->left[b >> 6] |= 1ULL << (b & 63);
                if (rows_r[j] && rows_r[j][b] && rows_r[j][b] - 1 < tok) inf->right[b >> 6] |= 1ULL << (b & 63);
            }
        e->char_index[cp] = (uint16_t)(++count);
    }
    /* a token [.. b] + the whole character, or the character + [b ..], ranked below the character's token: its
     * merge could come before the character's own in the characters' run and not in the bytes' */
    for (uint32_t s = 0; s <= e->mask; s++) {
        const Slot *sl = &e->slots[s];
        if (sl->rank == NO_RANK) continue;
        const uint8_t *t = e->arena + (sl->len_off & 0xFFFFFF);
        Py_ssize_t len = sl->len_off >> 24;
        for (Py_ssize_t k = len - 3; k < len; k++) {
            if (k < 1) continue;
            int32_t cp = one_bmp_char(t + k, len - k);
            uint16_t ci = cp >= 0 ? e->char_index[cp] : 0;
            if (ci && sl->rank < full[ci - 1].token) full[ci - 1].left[t[k - 1] >> 6] |= 1ULL << (t[k - 1] & 63);
        }
        for (Py_ssize_t k = 2; k <= 3 && k < len; k++) {
            int32_t cp = one_bmp_char(t, k);
            uint16_t ci = cp >= 0 ? e->char_index[cp] : 0;
            if (ci && sl->rank < full[ci - 1].token) full[ci - 1].right[t[k] >> 6] |= 1ULL << (t[k] & 63);
        }
    }
    /* the compact table: tokens, and the distinct masks once each */
    e->chars = PyMem_Calloc(count ? count : 1, sizeof(CharStart));
    e->masks = PyMem_Calloc(2 * (size_t)count + 1, sizeof(*e->masks));
    if (!e->chars || !e->masks) { PyErr_NoMemory(); goto done; }
    uint32_t distinct = 1; /* masks[0]: nothing marked */
    for (uint32_t c = 0; c < count; c++) {
        uint64_t *sides[2] = {full[c].left, full[c].right};
        uint16_t ids[2];
        for (int j = 0; j < 2; j++) {
            uint32_t k = 0;
            while (k < distinct && memcmp(e->masks[k], sides[j], sizeof(e->masks[k])) != 0) k++;
            if (k == distinct) memcpy(e->masks[distinct++], sides[j], sizeof(e->masks[k]));
            ids[j] = (uint16_t)k;
        }
        e->chars[c] = (CharStart){full[c].token, ids[0], ids[1]};
    }
    e->longest = PyMem_Calloc(count ? count : 1, 1);
    if (!e->longest) { PyErr_NoMemory(); goto done; }
    for (uint32_t s = 0; s <= e->mask; s++) {
        const Slot *sl = &e->slots[s];
        if (sl->rank == NO_RANK) continue;
        const uint8_t *t = e->arena + (sl->len_off & 0xFFFFFF);
        Py_ssize_t len = sl->len_off >> 24;
        int32_t cp = len >= 3 ? one_bmp_char(t, 3) : -1;
        uint16_t ci = cp >= 0 ? e->char_index[cp] : 0;
        if (ci && len > e->longest[ci - 1]) e->longest[ci - 1] = (uint8_t)(len > 255 ? 255 : len);
    }
    if (build_word_pairs(e) < 0) goto done;
    e->char_count = count;
    rc = 0;
done:
    PyMem_Free(left1); PyMem_Free(left2); PyMem_Free(right1); PyMem_Free(right2); PyMem_Free(full);
    return rc;
}

/* Encoder(ranks: dict[bytes, int], classes: bytes of 0x110000, marker: bytes) */
static int Encoder_init(Encoder *e, PyObject *args, PyObject *kw) {
    PyObject *ranks; Py_buffer classes, marker;
    if (!PyArg_ParseTuple(args, "O!y*y*", &PyDict_Type, &ranks, &classes, &marker)) return -1;
    int rc = -1;
    if (classes.len != 0x110000) { PyErr_SetString(PyExc_ValueError, "classes must have 0x110000 entries"); goto done; }
    Py_ssize_t n = PyDict_Size(ranks), total = 0, pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(ranks, &pos, &k, &v)) {
        if (!PyBytes_Check(k)) { PyErr_SetString(PyExc_TypeError, "ranks keys must be bytes"); goto done; }
        total += PyBytes_GET_SIZE(k);
    }
    uint32_t cap = 1; while (cap < (uint32_t)(2 * n + 1)) cap <<= 1;
    if (total >= (1 << 24)) { PyErr_SetString(PyExc_ValueError, "vocabulary too large"); goto done; }
    e->arena = PyMem_Malloc((size_t)total + 8);
    e->slots = PyMem_Malloc(sizeof(Slot) * cap); e->cls = PyMem_Malloc(0x110000);
    e->marker = PyMem_Malloc((size_t)marker.len + 1);
    e->filter = PyMem_Calloc(FILTER_WORDS, sizeof(uint64_t));
    if (!e->arena || !e->slots || !e->cls || !e->marker || !e->filter) { PyErr_NoMemory(); goto done; }
    memset(e->slots, 0xFF, sizeof(Slot) * cap);
    e->mask = cap - 1;
    memcpy(e->cls, classes.buf, 0x110000);
    memcpy(e->marker, marker.buf, (size_t)marker.len); e->marker_len = marker.len;
    uint32_t i = 0, off = 0; pos = 0;
    (void)i;
    while (PyDict_Next(ranks, &pos, &k, &v)) {
        Py_ssize_t len = PyBytes_GET_SIZE(k);
        unsigned long r = PyLong_AsUnsignedLong(v);
        if (PyErr_Occurred()) goto done;
        if (len == 0 || len > 255 || r >= NO_RANK) { PyErr_SetString(PyExc_ValueError, "bad vocabulary entry"); goto done; }
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(k);
        memcpy(e->arena + off, p, (size_t)len);
        uint64_t k8 = load8(p, len);
        uint64_t h = hash_key(k8, p, len);
        e->filter[(h >> 32) & (FILTER_WORDS - 1)] |= filter_bits(h);
        uint32_t s = (uint32_t)h & e->mask;
        while (e->slots[s].rank != NO_RANK) s = (s + 1) & e->mask;
        e->slots[s].key = k8; e->slots[s].rank = (uint32_t)r; e->slots[s].len_off = ((uint32_t)len << 24) | off;
        off += (uint32_t)len; i++;
    }
    e->pair_rank = PyMem_Malloc(sizeof(uint32_t) * 65536);
    if (!e->pair_rank) { PyErr_NoMemory(); goto done; }
    for (int b = 0; b < 256; b++) {
        uint8_t one = (uint8_t)b;
        e->byte_rank[b] = lookup(e, &one, 1);
        if (e->byte_rank[b] == NO_RANK) { PyErr_SetString(PyExc_ValueError, "vocabulary lacks a single byte"); goto done; }
    }
    for (uint32_t p2 = 0; p2 < 65536; p2++) {
        uint8_t two[2] = {(uint8_t)(p2 >> 8), (uint8_t)p2};
        e->pair_rank[p2] = lookup(e, two, 2);
    }
    if (build_char_table(e) < 0) goto done;
    rc = 0;
done:
    PyBuffer_Release(&classes); PyBuffer_Release(&marker);
    return rc;
}

/* A text's UTF-8: written into `scratch` (reused from document to document) rather than through
 * PyUnicode_AsUTF8AndSize, which allocates a copy per document and keeps it on the str for its lifetime (twice
 * a chunk's memory, and a malloc/free per document). ASCII text and a str that has its UTF-8 already are read
 * in place; a lone surrogate goes to PyUnicode_AsUTF8AndSize, which raises as before. */
typedef struct { uint8_t *p; Py_ssize_t cap; } Scratch;

static const uint8_t *text_utf8(PyObject *t, Py_ssize_t *n, Scratch *sc) {
    if (PyUnicode_IS_ASCII(t)) { *n = PyUnicode_GET_LENGTH(t); return PyUnicode_DATA(t); }
    Py_ssize_t len = PyUnicode_GET_LENGTH(t);
    int kind = PyUnicode_KIND(t);
    const void *data = PyUnicode_DATA(t);
    if (sc->cap < 4 * len) {
        Py_ssize_t cap = 4 * len > 1 << 16 ? 4 * len : 1 << 16;
        uint8_t *p = PyMem_Realloc(sc->p, (size_t)cap);
        if (!p) { PyErr_NoMemory(); return NULL; }
        sc->p = p; sc->cap = cap;
    }
    uint8_t *o = sc->p;
    for (Py_ssize_t i = 0; i < len; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c < 0x80) *o++ = (uint8_t)c;
        else if (c < 0x800) { *o++ = 0xC0 | (c >> 6); *o++ = 0x80 | (c & 0x3F); }
        else if (c < 0x10000) {
            if (c >= 0xD800 && c < 0xE000) return (const uint8_t *)PyUnicode_AsUTF8AndSize(t, n);
            *o++ = 0xE0 | (c >> 12); *o++ = 0x80 | ((c >> 6) & 0x3F); *o++ = 0x80 | (c & 0x3F);
        } else {
            *o++ = 0xF0 | (c >> 18); *o++ = 0x80 | ((c >> 12) & 0x3F); *o++ = 0x80 | ((c >> 6) & 0x3F);
            *o++ = 0x80 | (c & 0x3F);
        }
    }
    *n = o - sc->p;
    return sc->p;
}

/* --- JSON lines, read here ---------------------------------------------------------------------------------------
 * A worker would otherwise decode each line with orjson into a Python str (UTF-8 to UCS-2) and this module would
 * turn it back into UTF-8: a fifth of a worker's time on Japanese text. `json_line_text` reads the common line — a
 * JSON object whose key (once) holds a string — straight to the text's UTF-8, and says "defer" for anything else
 * (another shape, escapes it does not take, lone surrogates, invalid UTF-8, control characters, NaN, deep nesting,
 * a missing, repeated or non-string key, a blank line): those lines go to the Python reader (records.json_texts),
 * which decides what they are and words the error. So a line read here gives exactly what Python's json would. */

static inline const uint8_t *json_ws(const uint8_t *p, const uint8_t *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    return p;
}

/* the length of the valid UTF-8 sequence at p (as Python's strict decoder takes it), 0 if invalid */
static inline int utf8_valid_len(const uint8_t *p, const uint8_t *end) {
    uint8_t c = p[0];
    if (c < 0x80) return 1;
    if (c < 0xC2 || c > 0xF4) return 0;
    int n = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (end - p < n) return 0;
    for (int i = 1; i < n; i++) if ((p[i] & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && p[1] < 0xA0) return 0;          /* overlong */
    if (c == 0xED && p[1] >= 0xA0) return 0;         /* surrogate */
    if (c == 0xF0 && p[1] < 0x90) return 0;          /* overlong */
    if (c == 0xF4 && p[1] >= 0x90) return 0;         /* beyond U+10FFFF */
    return n;
}

static inline int hex4(const uint8_t *p, uint32_t *v) {
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p[i];
        x <<= 4;
        if (c >= '0' && c <= '9') x |= c - '0';
        else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') x |= (c | 0x20) - 'a' + 10;
        else return 0;
    }
    *v = x;
    return 1;
}

/* A JSON string at p (on its opening quote): its UTF-8 into out (when out is not NULL; out must have room for
 * end - p bytes), *q past the closing quote. 0: defer. */
static int json_string(const uint8_t *p, const uint8_t *end, uint8_t *out, Py_ssize_t *outlen, const uint8_t **q) {
    uint8_t *o = out;
    p++;
    for (;;) {
        const uint8_t *run = p; /* plain text up to the next quote or escape: copied at once */
        while (p < end) {
            uint8_t c = *p;
            if (c >= 0x80) {
                int n = utf8_valid_len(p, end);
                if (!n) return 0;
                p += n;
            } else if (c != '"' && c != '\\' && c >= 0x20) {
                p++;
            } else {
                break;
            }
        }
        if (o) { memcpy(o, run, (size_t)(p - run)); o += p - run; }
        if (p >= end || *p < 0x20) return 0;
        if (*p == '"') break;
        /* a backslash */
        if (end - p < 2) return 0;
        uint8_t c = p[1], r;
        switch (c) {
        case '"': r = '"'; break;
        case '\\': r = '\\'; break;
        case '/': r = '/'; break;
        case 'b': r = '\b'; break;
        case 'f': r = '\f'; break;
        case 'n': r = '\n'; break;
        case 'r': r = '\r'; break;
        case 't': r = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (end - p < 6 || !hex4(p + 2, &cp)) return 0;
            p += 6;
            if (cp >= 0xDC00 && cp < 0xE000) return 0;                      /* lone low surrogate */
            if (cp >= 0xD800 && cp < 0xDC00) {
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || !hex4(p + 2, &lo) || lo < 0xDC00 || lo >= 0xE000)
                    return 0;                                               /* lone high surrogate */
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
            if (o) {
                if (cp < 0x80) *o++ = (uint8_t)cp;
                else if (cp < 0x800) { *o++ = 0xC0 | (cp >> 6); *o++ = 0x80 | (cp & 0x3F); }
                else if (cp < 0x10000) { *o++ = 0xE0 | (cp >> 12); *o++ = 0x80 | ((cp >> 6) & 0x3F); *o++ = 0x80 | (cp & 0x3F); }
                else { *o++ = 0xF0 | (cp >> 18); *o++ = 0x80 | ((cp >> 12) & 0x3F); *o++ = 0x80 | ((cp >> 6) & 0x3F); *o++ = 0x80 | (cp & 0x3F); }
            }
            continue;
        }
        default: return 0;
        }
        if (o) *o++ = r;
        p += 2;
    }
    if (outlen) *outlen = o - out;
    *q = p + 1;
    return 1;
}

static int json_skip_value(const uint8_t *p, const uint8_t *end, int depth, const uint8_t **q);

static int json_skip_number(const uint8_t *p, const uint8_t *end, const uint8_t **q) {
    if (p < end && *p == '-') p++;
    if (p >= end) return 0;
    if (*p == '0') p++;
    else if (*p >= '1' && *p <= '9') while (p < end && *p >= '0' && *p <= '9') p++;
    else return 0;                                                          /* NaN, Infinity: Python's say */
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return 0;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return 0;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    *q = p;
    return 1;
}

static int json_skip_value(const uint8_t *p, const uint8_t *end, int depth, const uint8_t **q) {
    if (p >= end || depth > 64) return 0;
    switch (*p) {
    case '"': return json_string(p, end, NULL, NULL, q);
    case 't': if (end - p >= 4 && !memcmp(p, "true", 4)) { *q = p + 4; return 1; } return 0;
    case 'f': if (end - p >= 5 && !memcmp(p, "false", 5)) { *q = p + 5; return 1; } return 0;
    case 'n': if (end - p >= 4 && !memcmp(p, "null", 4)) { *q = p + 4; return 1; } return 0;
    case '[':
        p = json_ws(p + 1, end);
        if (p < end && *p == ']') { *q = p + 1; return 1; }
        for (;;) {
            if (!json_skip_value(p, end, depth + 1, &p)) return 0;
            p = json_ws(p, end);
            if (p < end && *p == ',') { p = json_ws(p + 1, end); continue; }
            if (p < end && *p == ']') { *q = p + 1; return 1; }
            return 0;
        }
    case '{':
        p = json_ws(p + 1, end);
        if (p < end && *p == '}') { *q = p + 1; return 1; }
        for (;;) {
            if (p >= end || *p != '"' || !json_string(p, end, NULL, NULL, &p)) return 0;
            p = json_ws(p, end);
            if (p >= end || *p != ':') return 0;
            if (!json_skip_value(json_ws(p + 1, end), end, depth + 1, &p)) return 0;
            p = json_ws(p, end);
            if (p < end && *p == ',') { p = json_ws(p + 1, end); continue; }
            if (p < end && *p == '}') { *q = p + 1; return 1; }
            return 0;
        }
    default: return json_skip_number(p, end, q);
    }
}

/* The UTF-8 of the string under `key` in the JSON object on line [p, end), into out (room for end - p bytes).
 * 1: found; 0: defer the line to Python. */
static int json_line_text(const uint8_t *p, const uint8_t *end, const uint8_t *key, Py_ssize_t klen,
                          uint8_t *out, Py_ssize_t *outlen) {
    int found = 0;
    p = json_ws(p, end);
    if (p >= end || *p != '{') return 0;
    p = json_ws(p + 1, end);
    if (p < end && *p == '}') return 0;
    for (;;) {
        const uint8_t *k = p, *kend;
        if (p >= end || *p != '"' || !json_string(p, end, NULL, NULL, &kend)) return 0;
        /* keys are compared as written: one with an escape is deferred rather than decoded */
        int is_key = kend - k - 2 == klen && memcmp(k + 1, key, (size_t)klen) == 0;
        if (memchr(k + 1, '\\', (size_t)(kend - k - 2))) return 0;
        p = json_ws(kend, end);
        if (p >= end || *p != ':') return 0;
        p = json_ws(p + 1, end);
        if (is_key) {
            if (found || p >= end || *p != '"' || !json_string(p, end, out, outlen, &p)) return 0;
            found = 1;
        } else if (!json_skip_value(p, end, 1, &p)) {
            return 0;
        }
        p = json_ws(p, end);
        if (p < end && *p == ',') { p = json_ws(p + 1, end); continue; }
        if (p < end && *p == '}') break;
        return 0;
    }
    return found && json_ws(p + 1, end) == end;
}

/* the ids of a document this module hands back: fallback(text) -> a sequence of ints, appended to out */
static int push_fallback(IdBuf *out, PyObject *fallback, PyObject *text) {
    PyObject *ids = PyObject_CallOneArg(fallback, text);
    if (!ids) return -1;
    PyObject *seq = PySequence_Fast(ids, "fallback must return a sequence of ints");
    Py_DECREF(ids);
    if (!seq) return -1;
    for (Py_ssize_t k = 0; k < PySequence_Fast_GET_SIZE(seq); k++) {
        unsigned long v = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(seq, k));
        if (PyErr_Occurred() || ids_push(out, (uint32_t)v) < 0) { Py_DECREF(seq); return -1; }
    }
    Py_DECREF(seq);
    return 0;
}

static int scratch_reserve(Scratch *sc, Py_ssize_t n) {
    if (sc->cap >= n) return 0;
    Py_ssize_t cap = n > 1 << 16 ? n : 1 << 16;
    uint8_t *p = PyMem_Realloc(sc->p, (size_t)cap);
    if (!p) { PyErr_NoMemory(); return -1; }
    sc->p = p; sc->cap = cap;
    return 0;
}

/* encode_lines(data, key, bos, eod, fallback, slow_line) -> (ids: bytes of uint32, lengths: bytes of int32, lines)
 * data: whole JSON lines (the last may lack its newline); key: the text field. A line json_line_text reads is one
 * document, [bos] + ids(text) + [eod] as encode_pack makes it; any other line goes to slow_line(line: bytes,
 * number: int) -> its text (str), None (a bad line, skipped: no document) or False (a bad line that ends the
 * chunk). lines: the lines gone through. */
static PyObject *Encoder_encode_lines(Encoder *e, PyObject *args) {
    Py_buffer data; const char *key; Py_ssize_t klen; long bos, eod; PyObject *fallback, *slow;
    if (!PyArg_ParseTuple(args, "y*s#llOO", &data, &key, &klen, &bos, &eod, &fallback, &slow)) return NULL;
    const uint8_t *p = data.buf, *end = p + data.len;
    IdBuf out = {0}, lens = {0}; Parts pt = {0}; Scratch line_text = {0}, str_text = {0};
    PyObject *result = NULL;
    Py_ssize_t line = 0;
    out.cap = data.len / 2 + 64; /* room for Japanese text's ~0.3 ids a byte, and then some */
    out.p = PyMem_Malloc((size_t)out.cap * sizeof(uint32_t));
    if (!out.p) { PyErr_NoMemory(); goto fail; }
    while (p < end) {
        const uint8_t *nl = memchr(p, '\n', (size_t)(end - p)), *le = nl ? nl : end;
        line++;
        if (scratch_reserve(&line_text, le - p) < 0) goto fail;
        Py_ssize_t n;
        const uint8_t *text;
        PyObject *str = NULL;
        if (json_line_text(p, le, (const uint8_t *)key, klen, line_text.p, &n)) {
            text = line_text.p;
        } else {
            PyObject *r = PyObject_CallFunction(slow, "y#n", (const char *)p, (Py_ssize_t)(le - p), line);
            if (!r) goto fail;
            if (r == Py_False) { Py_DECREF(r); break; }
            if (r == Py_None) { Py_DECREF(r); p = nl ? nl + 1 : end; continue; }
            if (!PyUnicode_Check(r)) { Py_DECREF(r); PyErr_SetString(PyExc_TypeError, "slow_line must return str, None or False"); goto fail; }
            str = r;
            if (!(text = text_utf8(str, &n, &str_text))) { Py_DECREF(str); goto fail; }
        }
        Py_ssize_t before = out.n;
        int rc = bos >= 0 ? ids_push(&out, (uint32_t)bos) : 0;
        if (rc == 0) rc = encode_text(e, text, n, &out, &pt);
        if (rc == 1) {
            if (!str) str = PyUnicode_DecodeUTF8((const char *)text, n, "strict");
            rc = str ? push_fallback(&out, fallback, str) : -1;
        }
        Py_XDECREF(str);
        if (rc < 0) goto fail;
        if (out.n > before && eod >= 0 && ids_push(&out, (uint32_t)eod) < 0) goto fail;
        if (ids_push(&lens, (uint32_t)(out.n - before)) < 0) goto fail;
        p = nl ? nl + 1 : end;
    }
    {
        PyObject *ids = PyBytes_FromStringAndSize((const char *)out.p, out.n * 4);
        PyObject *lengths = PyBytes_FromStringAndSize((const char *)lens.p, lens.n * 4);
        if (ids && lengths) result = Py_BuildValue("OOn", ids, lengths, line);
        Py_XDECREF(ids); Py_XDECREF(lengths);
    }
fail:
    PyBuffer_Release(&data);
    PyMem_Free(out.p); PyMem_Free(lens.p); parts_free(&pt); PyMem_Free(line_text.p); PyMem_Free(str_text.p);
    return result;
}

/* json_text(line, key) -> the UTF-8 of the string under key, or None where encode_lines defers the line */
static PyObject *module_json_text(PyObject *self, PyObject *args) {
    Py_buffer line; const char *key; Py_ssize_t klen;
    if (!PyArg_ParseTuple(args, "y*s#", &line, &key, &klen)) return NULL;
    PyObject *result = NULL;
    uint8_t *out = PyMem_Malloc((size_t)line.len + 1);
    Py_ssize_t n;
    if (!out) PyErr_NoMemory();
    else if (json_line_text(line.buf, (const uint8_t *)line.buf + line.len, (const uint8_t *)key, klen, out, &n))
        result = PyBytes_FromStringAndSize((const char *)out, n);
    else result = Py_NewRef(Py_None);
    PyMem_Free(out); PyBuffer_Release(&line);
    return result;
}

/* encode(text) -> list[int] | None (None: the document needs the fallback) */
static PyObject *Encoder_encode(Encoder *e, PyObject *text) {
    if (!PyUnicode_Check(text)) { PyErr_SetString(PyExc_TypeError, "text must be str"); return NULL; }
    Scratch sc = {0};
    Py_ssize_t n; const uint8_t *s = text_utf8(text, &n, &sc);
    if (!s) { PyMem_Free(sc.p); return NULL; }
    IdBuf out = {0}; Parts pt = {0};
    int rc = encode_text(e, s, n, &out, &pt);
    parts_free(&pt); PyMem_Free(sc.p);
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
    Py_ssize_t nd = PyList_GET_SIZE(texts);
    IdBuf out = {0}; Parts pt = {0}; Scratch sc = {0};
    PyObject *lengths = PyBytes_FromStringAndSize(NULL, nd * 4), *result = NULL;
    if (!lengths) return NULL;
    int32_t *lens = (int32_t *)PyBytes_AS_STRING(lengths);
    /* room for as many ids as characters (a token is at least a byte, and Japanese runs ~0.8 tokens a character),
     * so the buffer rarely grows */
    Py_ssize_t guess = 2 * nd + 1;
    for (Py_ssize_t d = 0; d < nd; d++) {
        PyObject *t = PyList_GET_ITEM(texts, d);
        if (PyUnicode_Check(t)) guess += PyUnicode_GET_LENGTH(t);
    }
    out.p = PyMem_Malloc((size_t)guess * sizeof(uint32_t));
    if (!out.p) { Py_DECREF(lengths); return PyErr_NoMemory(); }
    out.cap = guess;
    for (Py_ssize_t d = 0; d < nd; d++) {
        PyObject *t = PyList_GET_ITEM(texts, d);
        if (!PyUnicode_Check(t)) { PyErr_SetString(PyExc_TypeError, "texts must be str"); goto fail; }
        Py_ssize_t n; const uint8_t *s = text_utf8(t, &n, &sc);
        if (!s) goto fail;
        Py_ssize_t before = out.n;
        if (bos >= 0 && ids_push(&out, (uint32_t)bos) < 0) goto fail;
        int rc = encode_text(e, s, n, &out, &pt);
        if (rc < 0) goto fail;
        if (rc == 1 && push_fallback(&out, fallback, t) < 0) goto fail;
        if (out.n > before && eod >= 0 && ids_push(&out, (uint32_t)eod) < 0) goto fail;
        lens[d] = (int32_t)(out.n - before);
    }
    {
        PyObject *ids = PyBytes_FromStringAndSize((const char *)out.p, out.n * 4);
        if (ids) { result = PyTuple_Pack(2, ids, lengths); Py_DECREF(ids); }
    }
fail:
    PyMem_Free(out.p); parts_free(&pt); PyMem_Free(sc.p);
    Py_DECREF(lengths);
    return result;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O, "encode(text) -> list[int] | None"},
    {"encode_lines", (PyCFunction)Encoder_encode_lines, METH_VARARGS,
     "encode_lines(data, key, bos, eod, fallback, slow_line) -> (uint32 ids bytes, int32 lengths bytes, lines)"},
    {"encode_pack", (PyCFunction)Encoder_encode_pack, METH_VARARGS,
     "encode_pack(texts, bos, eod, fallback) -> (uint32 ids bytes, int32 lengths bytes)"},
    {NULL, NULL, 0, NULL},
};

#include <structmember.h>
static PyMemberDef Encoder_members[] = {
    {"char_count", T_PYSSIZET, offsetof(Encoder, char_count), READONLY,
     "characters BPE may start from whole (0: the vocabulary's ranks do not grow along merges)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "keizoku._bpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
    .tp_members = Encoder_members,
    .tp_doc = "Exact byte-level BPE with the Llama-3 pre-tokenizer.",
};

static PyMethodDef module_methods[] = {
    {"json_text", module_json_text, METH_VARARGS, "json_text(line, key) -> bytes | None (None: deferred)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "keizoku._bpe", NULL, -1, module_methods};

PyMODINIT_FUNC PyInit__bpe(void) {
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) { Py_DECREF(&EncoderType); Py_DECREF(m); return NULL; }
    return m;
}
