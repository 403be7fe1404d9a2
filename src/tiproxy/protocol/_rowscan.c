/*
 * The loops the profile says are worth compiling: passing over the rows of a result set, and
 * reading a whole small result response in one call (scan_result, below).
 *
 * skip_plain_rows(data, pos) -> (int, int)
 *   From offset `pos` of `data` (any object with the buffer protocol), walk whole packets whose
 *   first byte is neither 0xFE nor 0xFF, that are not empty and not 16 MiB long, and return the
 *   offset of the first packet that is none of those, or that is not wholly in `data`, and how
 *   many packets were passed over.
 *   The same contract as rows.skip_plain_rows_py, which stays as the fallback and the
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

#include "_scan.h"

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

/*
 * scan_result(data, pos, deprecate_eof, binary, status) -> (end, status, error, packets) | None
 * scan_whole (_scan.h) over `data` from `pos`; None where it returns 0.
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
    Py_ssize_t end, packets;
    long status_out;
    int error;
    int whole = scan_whole((const unsigned char *)view.buf, view.len, pos, deprecate_eof, binary,
                           status, &end, &status_out, &error, &packets);
    PyBuffer_Release(&view);
    if (!whole)
        Py_RETURN_NONE;
    return Py_BuildValue("(nlin)", end, status_out, error, packets);
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
