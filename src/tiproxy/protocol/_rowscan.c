/*
 * The one loop the profile says is worth compiling: passing over the rows of a result set.
 *
 * skip_plain_rows(data, pos) -> int
 *   From offset `pos` of `data` (any object with the buffer protocol), walk whole packets whose
 *   first byte is neither 0xFE nor 0xFF, that are not empty and not 16 MiB long, and return the
 *   offset of the first packet that is none of those, or that is not wholly in `data`.
 *   The same contract as tracker._skip_plain_rows_py, which stays as the fallback and the
 *   reference the tests compare against.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(pos);
}

static PyMethodDef methods[] = {
    {"skip_plain_rows", (PyCFunction)(void (*)(void))skip_plain_rows, METH_FASTCALL,
     "Offset of the first packet from pos that is not a plain whole row."},
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
