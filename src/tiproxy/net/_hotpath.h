/* What net/_hotpath.c and net/_direct.c, one extension, share. */
#ifndef TIPROXY_HOTPATH_H
#define TIPROXY_HOTPATH_H

#include <Python.h>

/* The compiled path's two functions (the module's command and response): True when they
 * relayed the chunk, False when the Python path must take it, NULL with an exception set. */
PyObject *hotpath_command(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *hotpath_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* While a DirectLeg serves a chunk: the transport the compiled path's write goes to, and a
 * descriptor of its socket to write to directly (-1 and NULL otherwise). */
struct direct_out {
    int fd;
    PyObject *transport;  /* borrowed, for the call */
};
extern struct direct_out hotpath_out;

/* Adds the DirectLeg type (net/_direct.c) to the module. */
int direct_add_type(PyObject *module);

#endif
