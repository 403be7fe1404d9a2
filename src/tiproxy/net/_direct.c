/*
 * DirectLeg: the event loop's reader callback for one socket of a steady session, in place of
 * the loop's stream.
 *
 * The event loop reads a socket through its stream machinery (a read callback, a bytes object,
 * a protocol call in a context) for every chunk: for a point select, most of what the proxy
 * spends above a bare relay. A session whose traffic the compiled path takes chunk after chunk
 * gains nothing from it. So relay.py moves such a session's sockets here: it pauses the
 * transports' reading, and has the loop watch a duplicate of each descriptor (add_reader) with
 * a DirectLeg as the callback. The DirectLeg reads the socket itself and hands the chunk to
 * command() or response() (net/_hotpath.c), exactly what the transport's Feed would have done.
 * (A duplicate, because the loop allows one watcher per descriptor number, and the transport
 * is one. One descriptor per session in a set of our own would cost a second poll per wake.)
 *
 * What the compiled path sends for such a chunk goes straight to the other socket (a duplicate
 * of its descriptor too) when that leg's transport holds nothing back; otherwise, and for
 * whatever the socket does not take at once, through the transport, which then sends the rest
 * in order and pauses the session's reading as ever. Every other write is the transport's.
 *
 * Anything else goes back to the transports, through
 * session._direct_exit(backend, data, error):
 *   - a chunk the compiled path refuses (data: the chunk, for the Python path);
 *   - the end of the stream (data None): nothing is read, so the transport meets the same end;
 *   - an error (a reset, a keep-alive timeout): its errno. The recv that met it consumed it,
 *     so relay.py reports it as the transport would have.
 * relay.py's exit stops these watchers, closes the duplicates and resumes the transports'
 * reading before it does anything else with the session; and everything in relay.py that pauses
 * a leg, detaches the backend leg, hands the session over or closes it does so first.
 *
 * An exception from the compiled path or the exit goes to session._direct_error(exc).
 *
 * A TLS leg is read and written here too, with its own TLS connection: the OpenSSL object of
 * Python's ssl.SSLObject, which the event loop's TLS protocol drives through two memory BIOs.
 * The DirectLeg does what that protocol would: it puts the bytes it read into the incoming BIO,
 * reads the plaintext out, and seals what goes to a TLS peer into its outgoing BIO, whose bytes
 * it sends on the socket, or through the TCP transport under the TLS one when that holds
 * something back. relay.py starts this only when the TLS protocol holds nothing in either
 * direction, and pauses the reading of both transports of the leg. The sockets go back to the
 * transports when the TLS connection has anything else to say (a close_notify, a key update to
 * answer, an alert), when the plaintext fills the buffer, and when a socket takes less than it
 * was given (flow control is then the transports' again); the TLS protocol then goes on from
 * the same state. A TLS failure (a record that does not decrypt, an alert) ends the leg: the
 * error is then OpenSSL's reason, a string.
 * The SSL object is private to Python's ssl module; its place, right after the weak reference
 * to the socket, has been the same since Python 3.0, and SSL_get_app_data, which that module
 * sets to the object, confirms it each time (else the session is not read directly).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "_hotpath.h"

#define CHUNK (256 * 1024)  /* what the event loop reads at a time, too */

typedef struct {
    PyObject_HEAD
    PyObject *session;
    int fd;
    int backend;
    int peer_fd;        /* a descriptor of the other leg's socket, which the answer goes to */
    PyObject *peer;     /* the other leg's transport */
    PyObject *tls;      /* this leg's ssl.SSLObject._sslobj, or NULL */
    SSL *ssl;
    PyObject *peer_tls; /* the other leg's, or NULL */
    SSL *peer_ssl;
    PyObject *peer_raw; /* the TCP transport under the other leg's TLS one, or NULL */
    vectorcallfunc vectorcall;
} DirectLeg;

static char chunk[CHUNK];
static char plain[CHUNK];           /* what a TLS leg's chunk decrypts to */
static char sealed[64 * 1024];      /* what the outgoing BIO holds, on its way to the socket */
static PyObject *s_direct_exit, *s_direct_error;

/* The head of CPython's _ssl._SSLSocket (see the top of this file). */
typedef struct {
    PyObject_HEAD
    PyObject *socket;
    SSL *ssl;
} ssl_socket_head;

/* The SSL object of an ssl.SSLObject's _sslobj; NULL if it is not one. */
static SSL *
ssl_of(PyObject *obj)
{
    if (obj == NULL || obj == Py_None || strcmp(Py_TYPE(obj)->tp_name, "_ssl._SSLSocket") != 0)
        return NULL;
    SSL *ssl = ((ssl_socket_head *)obj)->ssl;
    if (ssl == NULL || SSL_get_app_data(ssl) != (void *)obj)
        return NULL;
    return ssl;
}

/* tls_quiet(sslobj): whether a DirectLeg may drive this TLS connection now: it is one, and
 * nothing waits in it (no plaintext, no record read or to send). */
static PyObject *
tls_quiet(PyObject *module, PyObject *obj)
{
    SSL *ssl = ssl_of(obj);
    if (ssl == NULL || !SSL_is_init_finished(ssl) || SSL_pending(ssl) > 0
            || BIO_pending(SSL_get_rbio(ssl)) > 0 || BIO_pending(SSL_get_wbio(ssl)) > 0)
        Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

static PyMethodDef tls_quiet_def = {
    "tls_quiet", tls_quiet, METH_O,
    "tls_quiet(sslobj): whether a DirectLeg may drive this TLS connection (ssl.SSLObject's "
    "_sslobj) now: nothing waits in it.",
};

/* OpenSSL's error queue emptied, as SSL_get_error needs it before a call (and Python's ssl
 * module after one); ERR_clear_error walks the whole queue, so only when it holds anything. */
static inline void
clear_errors(void)
{
    if (ERR_peek_error() != 0)
        ERR_clear_error();
}

/* Why the last TLS call failed, as OpenSSL says it (a static string), and the queue emptied. */
static const char *
failure(void)
{
    const char *why = ERR_reason_error_string(ERR_peek_last_error());
    ERR_clear_error();
    return why != NULL ? why : "unknown error";
}

/* A TLS leg's chunk (in `chunk`) into the incoming BIO, and the plaintext out (into `plain`,
 * *size bytes): 0; 1 when the sockets go back to the transports after it (the connection has
 * more to say, or more plaintext than fits); -1 when the TLS connection failed (*why: how). */
static int
unseal(SSL *ssl, Py_ssize_t got, Py_ssize_t *size, const char **why_failed)
{
    *size = 0;
    clear_errors();
    if (BIO_write(SSL_get_rbio(ssl), chunk, (int)got) != got) {
        *why_failed = failure();
        return -1;
    }
    int why = 0;
    while (*size < CHUNK) {
        size_t n = 0;
        if (SSL_read_ex(ssl, plain + *size, (size_t)(CHUNK - *size), &n)) {
            *size += (Py_ssize_t)n;
            continue;
        }
        int e = SSL_get_error(ssl, 0);
        if (e == SSL_ERROR_ZERO_RETURN) {
            why = 1;  /* close_notify */
        } else if (e != SSL_ERROR_WANT_READ) {
            why = -1;
            *why_failed = failure();
        }
        break;
    }
    clear_errors();
    if (why == 0 && (*size == CHUNK || BIO_pending(SSL_get_wbio(ssl)) > 0))
        why = 1;  /* more plaintext than fits; an answer of its own (a key update) to send */
    return why;
}

int
direct_send_tls(PyObject *transport, PyObject *data)
{
    SSL *ssl = hotpath_out.ssl;
    Py_ssize_t held = held_back(transport);  /* the TLS protocol's own backlog */
    if (held < 0)
        return -1;
    if (held > 0) {
        hotpath_out.leave = 1;
        return write_to(transport, data);
    }
    Py_ssize_t raw_held = held_back(hotpath_out.raw);
    if (raw_held < 0)
        return -1;
    size_t written = 0;
    clear_errors();
    int ok = SSL_write_ex(ssl, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data),
                          &written);
    clear_errors();
    if (!ok || written != (size_t)PyBytes_GET_SIZE(data)) {
        /* (not expected of a memory BIO) The rest goes through the TLS protocol, which meets
         * whatever it was, and sends what was sealed here first, from the same BIO. */
        hotpath_out.leave = 1;
        PyObject *rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + written,
                                                   PyBytes_GET_SIZE(data) - (Py_ssize_t)written);
        if (rest == NULL)
            return -1;
        int r = write_to(transport, rest);
        Py_DECREF(rest);
        return r;
    }
    BIO *out = SSL_get_wbio(ssl);
    int direct = raw_held == 0, k;
    while ((k = BIO_read(out, sealed, (int)sizeof sealed)) > 0) {
        Py_ssize_t sent = 0;
        if (direct) {
            sent = send(hotpath_out.fd, sealed, (size_t)k, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (sent == k)
                continue;
            if (sent < 0)
                sent = 0;  /* full (EAGAIN) or an error: the TCP transport's write meets it */
            direct = 0;
        }
        PyObject *rest = PyBytes_FromStringAndSize(sealed + sent, k - sent);
        if (rest == NULL)
            return -1;
        int r = write_to(hotpath_out.raw, rest);
        Py_DECREF(rest);
        if (r < 0)
            return -1;
    }
    if (!direct)
        hotpath_out.leave = 1;  /* the transport holds bytes: its flow control takes over */
    return 0;
}

/* session._direct_error(exc) with the exception raised; one that escapes it is unraisable. */
static void
report(PyObject *session)
{
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc != NULL && tb != NULL)
        PyException_SetTraceback(exc, tb);
    PyObject *r = PyObject_CallMethodOneArg(session, s_direct_error, exc ? exc : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(exc);
    Py_XDECREF(tb);
    if (r == NULL)
        PyErr_WriteUnraisable(session);
    Py_XDECREF(r);
}

/* The loop calls this when the socket is readable. */
static PyObject *
leg_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    DirectLeg *leg = (DirectLeg *)self;
    if (PyVectorcall_NARGS(nargsf) != 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "DirectLeg()");
        return NULL;
    }
    PyObject *session = leg->session;
    if (session == NULL)
        Py_RETURN_NONE;
    Py_INCREF(session);
    PyObject *data = Py_None;
    ssize_t got = recv(leg->fd, chunk, CHUNK, MSG_DONTWAIT);  /* (never wait in the loop) */
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        goto done;
    /* got <= 0: the end of the stream, which the transport meets again once it reads; or an
     * error, which this recv consumed (the transport would meet the end of the stream after
     * it): its number goes along. */
    int error = got < 0 ? errno : 0, leave = got == 0;
    const char *bytes = chunk, *tls_failed = NULL;
    Py_ssize_t size = got > 0 ? got : 0;
    if (size > 0 && leg->ssl != NULL) {
        int why = unseal(leg->ssl, got, &size, &tls_failed);
        bytes = plain;
        if (why < 0)
            error = -1;
        else if (why > 0)
            leave = 1;
    }
    if (size > 0) {
        data = PyBytes_FromStringAndSize(bytes, size);
        if (data == NULL) {
            report(session);
            goto done;
        }
        PyObject *both[2] = {session, data};
        struct direct_out was = hotpath_out;
        hotpath_out.fd = leg->peer_fd;
        hotpath_out.transport = leg->peer;
        hotpath_out.ssl = leg->peer_ssl;
        hotpath_out.raw = leg->peer_raw;
        hotpath_out.leave = 0;
        PyObject *took = leg->backend ? hotpath_response(NULL, both, 2)
                                      : hotpath_command(NULL, both, 2);
        leave |= hotpath_out.leave;
        hotpath_out = was;
        if (took == NULL) {
            Py_DECREF(data);
            report(session);
            goto done;
        }
        Py_DECREF(took);
        if (took == Py_True) {
            Py_DECREF(data);
            data = Py_None;
        }
    }
    if (data == Py_None && !error && !leave)
        goto done;  /* relayed (or a TLS record not whole yet) */
    PyObject *code = tls_failed != NULL ? PyUnicode_FromString(tls_failed)
                                        : PyLong_FromLong(error);
    PyObject *r = code == NULL ? NULL : PyObject_CallMethodObjArgs(
        session, s_direct_exit, leg->backend ? Py_True : Py_False, data, code, NULL);
    Py_XDECREF(code);
    if (data != Py_None)
        Py_DECREF(data);
    if (r == NULL)
        report(session);
    Py_XDECREF(r);
done:
    Py_DECREF(session);
    Py_RETURN_NONE;
}

static PyObject *
leg_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *session, *peer, *tls = Py_None, *peer_tls = Py_None, *peer_raw = Py_None;
    int fd, backend, peer_fd;
    if (!PyArg_ParseTuple(args, "OipiO|OOO:DirectLeg", &session, &fd, &backend, &peer_fd,
                          &peer, &tls, &peer_tls, &peer_raw))
        return NULL;
    if (fd < 0 || peer_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "DirectLeg: descriptors");
        return NULL;
    }
    SSL *ssl = ssl_of(tls), *peer_ssl = ssl_of(peer_tls);
    if ((tls != Py_None && ssl == NULL) || (peer_tls != Py_None && peer_ssl == NULL)
            || ((peer_ssl == NULL) != (peer_raw == Py_None))) {
        PyErr_SetString(PyExc_ValueError, "DirectLeg: not a TLS connection it can drive");
        return NULL;
    }
    DirectLeg *leg = (DirectLeg *)type->tp_alloc(type, 0);
    if (leg == NULL)
        return NULL;
    leg->session = Py_NewRef(session);
    leg->fd = fd;
    leg->backend = backend;
    leg->peer_fd = peer_fd;
    leg->peer = Py_NewRef(peer);
    leg->tls = ssl ? Py_NewRef(tls) : NULL;
    leg->ssl = ssl;
    leg->peer_tls = peer_ssl ? Py_NewRef(peer_tls) : NULL;
    leg->peer_ssl = peer_ssl;
    leg->peer_raw = peer_ssl ? Py_NewRef(peer_raw) : NULL;
    leg->vectorcall = leg_call;
    return (PyObject *)leg;
}

static int
leg_traverse(DirectLeg *leg, visitproc visit, void *arg)
{
    Py_VISIT(leg->session);
    Py_VISIT(leg->peer);
    Py_VISIT(leg->tls);
    Py_VISIT(leg->peer_tls);
    Py_VISIT(leg->peer_raw);
    return 0;
}

static int
leg_clear(DirectLeg *leg)
{
    Py_CLEAR(leg->session);
    Py_CLEAR(leg->peer);
    Py_CLEAR(leg->tls);
    Py_CLEAR(leg->peer_tls);
    Py_CLEAR(leg->peer_raw);
    leg->ssl = leg->peer_ssl = NULL;
    return 0;
}

static void
leg_dealloc(DirectLeg *leg)
{
    PyObject_GC_UnTrack(leg);
    leg_clear(leg);
    Py_TYPE(leg)->tp_free((PyObject *)leg);
}

static PyTypeObject DirectLegType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tiproxy.net._hotpath.DirectLeg",
    .tp_doc = "DirectLeg(session, fd, backend, peer_fd, peer[, tls, peer_tls, peer_raw]): the "
              "loop's reader callback for one socket; the answer goes to peer_fd, the other "
              "leg's (transport peer). tls, peer_tls: the legs' ssl.SSLObject._sslobj, for a "
              "TLS leg; peer_raw: the TCP transport under the peer's TLS transport.",
    .tp_basicsize = sizeof(DirectLeg),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = leg_new,
    .tp_traverse = (traverseproc)leg_traverse,
    .tp_clear = (inquiry)leg_clear,
    .tp_dealloc = (destructor)leg_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(DirectLeg, vectorcall),
};

int
direct_add_type(PyObject *module)
{
    if ((s_direct_exit = PyUnicode_InternFromString("_direct_exit")) == NULL
            || (s_direct_error = PyUnicode_InternFromString("_direct_error")) == NULL)
        return -1;
    if (PyType_Ready(&DirectLegType) < 0)
        return -1;
    Py_INCREF(&DirectLegType);
    if (PyModule_AddObject(module, "DirectLeg", (PyObject *)&DirectLegType) < 0) {
        Py_DECREF(&DirectLegType);
        return -1;
    }
    PyObject *quiet = PyCFunction_NewEx(&tls_quiet_def, NULL, NULL);
    if (quiet == NULL || PyModule_AddObject(module, "tls_quiet", quiet) < 0) {
        Py_XDECREF(quiet);
        return -1;
    }
    return 0;
}
