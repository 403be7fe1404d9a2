/*
 * The loops the profile says are worth compiling: passing over the rows of a result set, and
 * reading a whole small result response in one call (scan_result, below).
 *
 * skip_plain_rows(data, pos) -> (int, int)
 *   From offset `pos` of `data` (any object with the buffer protocol), walk whole packets whose
 *   first byte is neither 0xFE nor 0xFF, that are not empty and not 16 MiB long, and return the
 *   offset of the first packet that is none of those, or that is not wholly in `data`, and how
 *   many packets were passed over.
 *   The same contract as tracker._skip_plain_rows_py, which stays as the fallback and the
 *   reference the tests compare against.
 *
 * sum_rows(data, pos, crc) -> (pos, rows, crc)
 *   The same walk, for a traffic capture's writer (traffic/outcome.py): also how many rows it
 *   passed and the CRC-32 of their payloads, continuing `crc`: zlib's crc32, as Python's
 *   zlib.crc32(row, crc) over the same rows (the Python fallback) computes it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <zlib.h>

static PyObject *
skip_plain_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t pos;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "skip_plain_rows(data, pos)");
        return NULL;
    }
    pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    if (pos < 0)
        pos = 0;
    Py_ssize_t packets = 0;
    while (pos + 4 < n) {
        Py_ssize_t length = (Py_ssize_t)p[pos] | (Py_ssize_t)p[pos + 1] << 8
                            | (Py_ssize_t)p[pos + 2] << 16;
        Py_ssize_t end = pos + 4 + length;
        if (end > n || length == 0 || length == 0xFFFFFF)
            break;
        unsigned char first = p[pos + 4];
        if (first == 0xFE || first == 0xFF)
            break;
        pos = end;
        packets++;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nn)", pos, packets);
}

static PyObject *
sum_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "sum_rows(data, pos, crc)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    unsigned long crc = PyLong_AsUnsignedLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len, rows = 0;
    /* Rows are short: zlib's crc32 is fast on long runs and slow to start, so the payloads are
     * gathered into runs of up to ROW_RUN bytes (the CRC of the concatenation is the chain's). */
    enum { ROW_RUN = 16384 };
    unsigned char run[ROW_RUN];
    Py_ssize_t used = 0;
    if (pos < 0)
        pos = 0;
    while (pos + 4 < n) {
        Py_ssize_t length = (Py_ssize_t)p[pos] | (Py_ssize_t)p[pos + 1] << 8
                            | (Py_ssize_t)p[pos + 2] << 16;
        Py_ssize_t end = pos + 4 + length;
        if (end > n || length == 0 || length == 0xFFFFFF)
            break;
        unsigned char first = p[pos + 4];
        if (first == 0xFE || first == 0xFF)
            break;
        if (used + length > ROW_RUN) {
            crc = crc32(crc, run, (uInt)used);
            used = 0;
        }
        if (length > ROW_RUN) {
            crc = crc32(crc, p + pos + 4, (uInt)length);
        } else {
            memcpy(run + used, p + pos + 4, (size_t)length);
            used += length;
        }
        rows++;
        pos = end;
    }
    crc = crc32(crc, run, (uInt)used);
    PyBuffer_Release(&view);
    return Py_BuildValue("(nnk)", pos, rows, crc);
}

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

/* Status flags of a terminator (EOF of 5 bytes, or an OK); -1 if malformed. */
static long
terminator(const unsigned char *p, Py_ssize_t start, Py_ssize_t length)
{
    if (length == 5)
        return p[start + 3] | p[start + 4] << 8;
    Py_ssize_t at = start + 1, end = start + length;
    unsigned long long skip;
    if (lenenc(p, &at, end, &skip) || lenenc(p, &at, end, &skip) || at + 2 > end)
        return -1;
    return p[at] | p[at + 1] << 8;
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

/*
 * scan_result(data, pos, deprecate_eof, binary, status) -> (end, status, error, packets) | None
 * binary: 0 text, 1 binary, 2 binary with a cursor asked for (only then CURSOR_EXISTS after the
 * column definitions ends the response).
 *
 * A whole result response (what COM_QUERY or COM_STMT_EXECUTE gets back, several results if
 * MORE_RESULTS_EXISTS says so) lying wholly in `data` from `pos`: where it ends, the status
 * after it, the code of the ERR it ended with (0 if none, 1 if the ERR is too short to hold
 * a code) and how many packets it held. None whenever anything is not plain: the response
 * does not end in `data`, a 16 MiB packet, LOCAL INFILE, a terminator or 251+ columns where the
 * first packet is, a progress report, or bytes that are not a response. The tracker then reads
 * the same bytes with its Python state machine, which is the reference; this only makes the
 * common case cheap.
 */
static PyObject *
scan_result(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "scan_result(data, pos, deprecate_eof, binary, status)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    int deprecate_eof = PyObject_IsTrue(args[2]);
    long binary = PyLong_AsLong(args[3]);
    long status = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    Py_ssize_t n = view.len;
    int error = 0, done = 0;
    Py_ssize_t packets = 0;

#define PACKET(len_, first_)                                                               \
    if (pos < 0 || pos + 4 > n) goto plain;                                                \
    len_ = (Py_ssize_t)p[pos] | (Py_ssize_t)p[pos + 1] << 8 | (Py_ssize_t)p[pos + 2] << 16; \
    if (len_ == 0 || len_ == 0xFFFFFF || pos + 4 + len_ > n) goto plain;                    \
    first_ = p[pos + 4];                                                                   \
    packets++;

    while (!done) {
        Py_ssize_t len;
        unsigned char first;
        PACKET(len, first)
        if (first == 0x00) {                       /* OK */
            long st = terminator(p, pos + 4, len);
            if (st < 0) goto plain;
            status = st;
            pos += 4 + len;
            done = !(st & MORE_RESULTS);
            continue;
        }
        if (first == 0xFF) {                       /* ERR: the response ends */
            if (len >= 3 && p[pos + 5] == 0xFF && p[pos + 6] == 0xFF)
                goto plain;                        /* a progress report: it does not */
            error = error_code(p, pos + 4, len);
            pos += 4 + len;
            break;
        }
        if (first >= 0xFB)                         /* LOCAL INFILE, a terminator, 251+ columns */
            goto plain;
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
            if (first != 0xFE) goto plain;
            long st = terminator(p, pos + 4, len);
            if (st < 0) goto plain;
            pos += 4 + len;
            status = st;
            if (binary == 2 && (st & CURSOR_EXISTS)) {  /* a cursor: rows come with COM_STMT_FETCH */
                done = !(st & MORE_RESULTS);
                continue;
            }
        }
        for (;;) {                                 /* rows, then a terminator or an ERR */
            PACKET(len, first)
            pos += 4 + len;
            if (first == 0xFE) {
                long st = terminator(p, pos - len, len);
                if (st < 0) goto plain;
                status = st;
                done = !(st & MORE_RESULTS);
                break;
            }
            if (first == 0xFF) {
                if (len >= 3 && p[pos - len + 1] == 0xFF && p[pos - len + 2] == 0xFF)
                    goto plain;                    /* a progress report between rows */
                error = error_code(p, pos - len, len);
                done = 1;
                break;
            }
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nlin)", pos, status & ~MORE_RESULTS, error, packets);
plain:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
#undef PACKET
}

static PyMethodDef methods[] = {
    {"skip_plain_rows", (PyCFunction)(void (*)(void))skip_plain_rows, METH_FASTCALL,
     "Offset of the first packet from pos that is not a plain whole row, and rows passed."},
    {"scan_result", (PyCFunction)(void (*)(void))scan_result, METH_FASTCALL,
     "End, status, failure and packets of a whole result response, or None."},
    {"sum_rows", (PyCFunction)(void (*)(void))sum_rows, METH_FASTCALL,
     "Offset after the plain whole rows from pos, their count and their payloads' CRC-32."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rowscan", "Compiled row scanning for the response tracker.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__rowscan(void)
{
    return PyModule_Create(&module);
}
