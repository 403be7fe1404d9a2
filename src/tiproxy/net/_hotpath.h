/* What net/_hotpath.c and net/_direct.c, one extension, share. */
#ifndef TIPROXY_HOTPATH_H
#define TIPROXY_HOTPATH_H

#include <Python.h>

/* The compiled path's two functions (the module's command and response): True when they
 * relayed the chunk, False when the Python path must take it, NULL with an exception set. */
PyObject *hotpath_command(PyObject *module, PyObject *const *args, Py_ssize_t nargs);
PyObject *hotpath_response(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* While a DirectLeg serves a chunk: the transport the compiled path's write goes to, and a
 * descriptor of its socket to write to directly (-1 and NULL otherwise). For a TLS leg, also
 * its TLS connection (what net/_direct.c's direct_send seals with) and the TCP transport
 * under the TLS one. `leave` asks the DirectLeg to give the sockets back after the chunk. */
struct direct_out {
    int fd;
    PyObject *transport;  /* borrowed, for the call */
    void *ssl;            /* an OpenSSL SSL*, or NULL */
    PyObject *raw;        /* borrowed; NULL without TLS */
    int leave;
};
extern struct direct_out hotpath_out;

/* Seal `data` with hotpath_out.ssl and send it on hotpath_out's socket (net/_direct.c): 0, or
 * -1 with an exception set. */
int direct_send_tls(PyObject *transport, PyObject *data);

/* transport.get_write_buffer_size(): -1 with an exception set. */
Py_ssize_t held_back(PyObject *transport);

/* transport.write(data): 0, or -1 with an exception set. */
int write_to(PyObject *transport, PyObject *data);

/* Adds the DirectLeg type (net/_direct.c) to the module. */
int direct_add_type(PyObject *module);

#endif
