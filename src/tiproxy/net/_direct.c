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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stddef.h>
#include <sys/socket.h>

#include "_hotpath.h"

#define CHUNK (256 * 1024)  /* what the event loop reads at a time, too */

typedef struct {
    PyObject_HEAD
    PyObject *session;
    int fd;
    int backend;
    int peer_fd;        /* a descriptor of the other leg's socket, which the answer goes to */
    PyObject *peer;     /* the other leg's transport */
    vectorcallfunc vectorcall;
} DirectLeg;

static char chunk[CHUNK];
static PyObject *s_direct_exit, *s_direct_error;

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
    if (got > 0) {
        data = PyBytes_FromStringAndSize(chunk, got);
        if (data == NULL) {
            report(session);
            goto done;
        }
        PyObject *both[2] = {session, data};
        struct direct_out was = hotpath_out;
        hotpath_out.fd = leg->peer_fd;
        hotpath_out.transport = leg->peer;
        PyObject *took = leg->backend ? hotpath_response(NULL, both, 2)
                                      : hotpath_command(NULL, both, 2);
        hotpath_out = was;
        if (took == NULL) {
            Py_DECREF(data);
            report(session);
            goto done;
        }
        Py_DECREF(took);
        if (took == Py_True) {
            Py_DECREF(data);
            goto done;
        }
    }
    /* got <= 0: the end of the stream, which the transport meets again once it reads; or an
     * error, which this recv consumed (the transport would meet the end of the stream after
     * it): its number goes along. */
    PyObject *error = PyLong_FromLong(got < 0 ? errno : 0);
    PyObject *r = error == NULL ? NULL : PyObject_CallMethodObjArgs(
        session, s_direct_exit, leg->backend ? Py_True : Py_False, data, error, NULL);
    Py_XDECREF(error);
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
    PyObject *session, *peer;
    int fd, backend, peer_fd;
    if (!PyArg_ParseTuple(args, "OipiO:DirectLeg", &session, &fd, &backend, &peer_fd, &peer))
        return NULL;
    if (fd < 0 || peer_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "DirectLeg: descriptors");
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
    leg->vectorcall = leg_call;
    return (PyObject *)leg;
}

static int
leg_traverse(DirectLeg *leg, visitproc visit, void *arg)
{
    Py_VISIT(leg->session);
    Py_VISIT(leg->peer);
    return 0;
}

static int
leg_clear(DirectLeg *leg)
{
    Py_CLEAR(leg->session);
    Py_CLEAR(leg->peer);
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
    .tp_doc = "DirectLeg(session, fd, backend, peer_fd, peer): the loop's reader callback for "
              "one socket; the answer goes to peer_fd, the other leg's (transport peer).",
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
    return 0;
}
