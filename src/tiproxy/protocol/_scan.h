/*
 * Reading a whole result response in C: shared by protocol/_rowscan.c (scan_result, for the
 * response tracker) and net/_hotpath.c (the relay's per-query path). Static functions only:
 * each module that includes this file gets its own copy.
 */
#ifndef TIPROXY_SCAN_H
#define TIPROXY_SCAN_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* A length-encoded integer at p[*at], within [.., end). Returns 0 on success. */
static int
lenenc(const unsigned char *p, Py_ssize_t *at, Py_ssize_t end, unsigned long long *out)
{
    Py_ssize_t i = *at;
    if (i >= end)
        return -1;
    unsigned char b = p[i];
    int size = b < 0xFB ? 0 : b == 0xFC ? 2 : b == 0xFD ? 3 : b == 0xFE ? 8 : -1;
    if (size < 0 || i + 1 + size > end)
        return -1;
    if (size == 0) {
        *out = b;
    } else {
        unsigned long long v = 0;
        for (int k = size - 1; k >= 0; k--)
            v = v << 8 | p[i + 1 + k];
        *out = v;
    }
    *at = i + 1 + size;
    return 0;
}

/* Status flags of an OK packet (after its two counts, whatever its length); -1 if malformed. */
static long
ok_status(const unsigned char *p, Py_ssize_t start, Py_ssize_t length)
{
    Py_ssize_t at = start + 1, end = start + length;
    unsigned long long skip;
    if (lenenc(p, &at, end, &skip) || lenenc(p, &at, end, &skip) || at + 2 > end)
        return -1;
    return p[at] | p[at + 1] << 8;
}

/* Status flags of a terminator (EOF of 5 bytes, or an OK); -1 if malformed. */
static long
terminator(const unsigned char *p, Py_ssize_t start, Py_ssize_t length)
{
    if (length == 5)
        return p[start + 3] | p[start + 4] << 8;
    return ok_status(p, start, length);
}

/* The code of an ERR packet; 1 when it is too short to hold one (0 means "no error"). */
static int
error_code(const unsigned char *p, Py_ssize_t start, Py_ssize_t length)
{
    int code = length >= 3 ? (p[start + 1] | p[start + 2] << 8) : 0;
    return code ? code : 1;
}

#define MORE_RESULTS 0x0008
#define CURSOR_EXISTS 0x0040

#define SCAN_MORE_RESULTS 0x0008
#define SCAN_CURSOR_EXISTS 0x0040

/*
 * A whole result response (what COM_QUERY or COM_STMT_EXECUTE gets back, several results if
 * MORE_RESULTS_EXISTS says so) lying wholly in p[pos..n): returns 1 and sets where it ends,
 * the status after it (MORE_RESULTS cleared), the code of the ERR it ended with (0 if none, 1
 * if the ERR is too short to hold a code) and how many packets it held. Returns 0 whenever
 * anything is not plain: the response does not end in the buffer, a 16 MiB packet, LOCAL
 * INFILE, a terminator or 251+ columns where the first packet is, a progress report, or bytes
 * that are not a response. The tracker's Python state machine (tracker.py) is the reference.
 * binary: 0 text, 1 binary, 2 binary with a cursor asked for (only then CURSOR_EXISTS after
 * the column definitions ends the response).
 */
static int
scan_whole(const unsigned char *p, Py_ssize_t n, Py_ssize_t pos, int deprecate_eof, long binary,
           long status, Py_ssize_t *end_out, long *status_out, int *error_out,
           Py_ssize_t *packets_out)
{
    int error = 0, done = 0;
    Py_ssize_t packets = 0;

#define PACKET(len_, first_)                                                               \
    if (pos < 0 || pos + 4 > n) return 0;                                                  \
    len_ = (Py_ssize_t)p[pos] | (Py_ssize_t)p[pos + 1] << 8 | (Py_ssize_t)p[pos + 2] << 16; \
    if (len_ == 0 || len_ == 0xFFFFFF || pos + 4 + len_ > n) return 0;                      \
    first_ = p[pos + 4];                                                                   \
    packets++;

    while (!done) {
        Py_ssize_t len;
        unsigned char first;
        PACKET(len, first)
        if (first == 0x00) {                       /* OK: never read as a 5-byte EOF */
            long st = ok_status(p, pos + 4, len);
            if (st < 0) return 0;
            status = st;
            pos += 4 + len;
            done = !(st & SCAN_MORE_RESULTS);
            continue;
        }
        if (first == 0xFF) {                       /* ERR: the response ends */
            if (len >= 3 && p[pos + 5] == 0xFF && p[pos + 6] == 0xFF)
                return 0;                          /* a progress report: it does not */
            error = error_code(p, pos + 4, len);
            pos += 4 + len;
            break;
        }
        if (first >= 0xFB)                         /* LOCAL INFILE, a terminator, 251+ columns */
            return 0;
        /* MariaDB's cached metadata: a 0 "metadata follows" byte after the count means no
         * column definitions (an execute whose client already has them); the EOF stays. */
        Py_ssize_t columns = len > 1 && p[pos + 5] == 0 ? 0 : first;
        pos += 4 + len;
        for (Py_ssize_t c = 0; c < columns; c++) {
            PACKET(len, first)
            pos += 4 + len;
        }
        if (!deprecate_eof) {                      /* the EOF after the column definitions */
            PACKET(len, first)
            if (first != 0xFE) return 0;
            long st = terminator(p, pos + 4, len);
            if (st < 0) return 0;
            pos += 4 + len;
            status = st;
            if (binary == 2 && (st & SCAN_CURSOR_EXISTS)) {  /* rows come with COM_STMT_FETCH */
                done = !(st & SCAN_MORE_RESULTS);
                continue;
            }
        }
        for (;;) {                                 /* rows, then a terminator or an ERR */
            PACKET(len, first)
            pos += 4 + len;
            if (first == 0xFE) {
                long st = terminator(p, pos - len, len);
                if (st < 0) return 0;
                status = st;
                done = !(st & SCAN_MORE_RESULTS);
                break;
            }
            if (first == 0xFF) {
                if (len >= 3 && p[pos - len + 1] == 0xFF && p[pos - len + 2] == 0xFF)
                    return 0;                      /* a progress report between rows */
                error = error_code(p, pos - len, len);
                done = 1;
                break;
            }
        }
    }
#undef PACKET
    *end_out = pos;
    *status_out = status & ~SCAN_MORE_RESULTS;
    *error_out = error;
    *packets_out = packets;
    return 1;
}

#endif
